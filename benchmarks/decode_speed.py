"""How fast does one token come out at batch 1, and how close does EAD come to its ideal?

Random bf16 weights at the real shapes of Qwen2.5-0.5B, -1.5B and -14B, built on the device (speed does not
depend on the values; nothing is downloaded). One JSON object per configuration on stdout, and with --out in
a file too; a short table goes to stderr at the end.

- copy_floor: the fastest a decode step can be if it reads every weight once at the device's measured copy
  bandwidth (bytes read + written per second of a large device-to-device copy); `floor_with_kv_ms` adds a
  read of the whole static KV cache, which decode attention reads today.
- native_eager / native_graph: ead's NativeRunner, decode step launched op by op or replayed as a CUDA
  graph. Each token does Engine.step's device work (feed, entropy, argmax) and its one host sync.
  native_graph_cacheN: the same with a small static cache, to show what attending over 4096 slots costs.
- ead: small -> large with a scripted routing pattern at large-token share f (segments of >= 10 tokens); a
  model taking over feeds the tokens it missed in one eager pass, as Engine.step does. Compared with the ideal
  f*T_large + (1-f)*T_small per token, T from the same run's one-token steps.
- hf_generate, hf_runner: transformers eager (its `generate`, and ead's ModelRunner) on the 1.5B shape.
- native_graph_compiled (diagnostic, --compile, run last): the decode graph captured from torch.compile'd
  code, to show what fusing the many small kernels of a step would gain. Not an ead feature (yet).

Warm-up and graph capture are reported apart from steady state; the device is synchronised before every
timer read.

    PYTHONUNBUFFERED=1 python benchmarks/decode_speed.py --compile qwen2.5-1.5b qwen2.5-14b \
        --out runs/decode_speed.jsonl      # about 3 minutes on an H100 (PYTHONPATH=. if ead is not installed)
    python benchmarks/decode_speed.py --device cpu --dtype float32 --shapes tiny --ead tiny tiny-large \
        --hf-shape tiny --tokens 8 --ead-tokens 60 --hf-tokens 4 --prompt-tokens 16 --copy-bytes 10000000 \
        --max-seq-tokens 256               # smoke test on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

from ead.config import Role
from ead.models.graphs import DecodeGraph
from ead.models.transformer import ModelArgs, Transformer, rope_inv_freq
from ead.router import entropy_bits
from ead.runner import ModelRunner, NativeRunner

SHAPES = {  # Qwen2.5 base configs: (hidden, layers, heads / kv heads, MLP width, vocab, tied embeddings)
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-14b": dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
    "tiny-large": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=256, vocab_size=512, tie_word_embeddings=False),
}
MIN_SEGMENT_TOKENS = 10  # the paper's minimum dwell: no model writes fewer tokens in a row


def hf_config(shape: str) -> Qwen2Config:
    return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       use_sliding_window=False)


def random_native(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Our Transformer at `shape`, random weights made on `device` in `dtype` (a 14B model never touches host
    memory, and never exists in float32)."""
    args = ModelArgs.from_hf_config(hf_config(shape))
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    if args.tie_word_embeddings:  # to_empty gives each module its own tensor
        model.output.weight = model.tok_embeddings.weight
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    model.inv_freq = rope_inv_freq(args).to(device)  # float32, as load_native keeps it
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors counted once


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """A host clock read after every queued device operation has finished."""
    sync(device)
    return time.perf_counter()


@contextlib.contextmanager
def memory_scope(device: torch.device, out: dict) -> Iterator[None]:
    """Record the peak bytes allocated on the device inside the block (everything alive then counts)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def engine_step(runner, fed: list[int]) -> int:
    """Engine.step's device work for one greedy token: feed, entropy for the router, argmax, one host sync."""
    logits = runner.feed(fed)
    bits, token = entropy_bits(logits), logits.argmax()
    _, token_id = torch.stack([bits, token.to(bits.dtype)]).tolist()  # the one host sync per token
    return int(token_id)


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of random bytes; median of 20."""
    src = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        t0 = now(device)
        dst.copy_(src)
        if i >= 3:  # three warm-up copies
            times.append(now(device) - t0)
    return 2 * n_bytes / statistics.median(times)


def time_decode(runner, prompt: list[int], warmup_tokens: int, tokens: int, device: torch.device) -> dict:
    """Prefill `prompt`, then greedy one-token steps: the first `warmup_tokens` reported apart."""
    runner.reset()
    t0 = now(device)
    token = engine_step(runner, prompt)
    prefill_ms = (now(device) - t0) * 1e3
    steps = []
    for _ in range(warmup_tokens + tokens):
        t0 = now(device)
        token = engine_step(runner, [token])
        steps.append(now(device) - t0)
    warm, steady = steps[:warmup_tokens], steps[warmup_tokens:]
    return {"prompt_tokens": len(prompt), "prefill_ms": prefill_ms, "warmup_tokens": warmup_tokens,
            "warmup_ms": sum(warm) * 1e3, "tokens": tokens, "step_ms": statistics.median(steady) * 1e3,
            "step_ms_mean": statistics.mean(steady) * 1e3, "step_ms_max": max(steady) * 1e3,
            "decode_tok_per_s": len(steady) / sum(steady)}


def time_replay(runner: NativeRunner, replays: int, device: torch.device) -> float:
    """ms per replay of the decode graph alone, back to back: a step's GPU time without the host's part (entropy,
    argmax, the sync, Python). Call it after the sequence is done: it rewrites the slot after the last token."""
    lengths = runner.cache.lengths.clone()
    runner.graph.run(0, runner.seen)
    t0 = now(device)
    for _ in range(replays):
        runner.graph.graph.replay()
    ms = (now(device) - t0) * 1e3 / replays
    runner.cache.lengths.copy_(lengths)
    return ms


def time_runner_setup(model: Transformer, max_seq_tokens: int, cuda_graphs: bool,
                      device: torch.device) -> tuple[NativeRunner, float]:
    """A NativeRunner and the ms its construction took (cache allocation, and graph warm-up + capture)."""
    t0 = now(device)
    runner = NativeRunner(model, model.args.vocab_size, max_seq_tokens, cuda_graphs)
    return runner, (now(device) - t0) * 1e3


def sdpa_backend(model: Transformer, max_seq_tokens: int, device: torch.device) -> str:
    """The SDPA backend PyTorch picks for a decode step's attention call (shapes and mask as in forward)."""
    a = model.args
    dtype = model.tok_embeddings.weight.dtype
    q = torch.zeros(1, a.n_heads, 1, a.head_dim, dtype=dtype, device=device)
    k = torch.zeros(1, a.n_kv_heads, max_seq_tokens + 1, a.head_dim, dtype=dtype, device=device)
    mask = torch.ones(1, 1, 1, max_seq_tokens + 1, dtype=torch.bool, device=device)
    try:
        from torch.nn.attention import SDPBackend
        names = {int(b): n for n, b in SDPBackend.__members__.items()}
        return names.get(torch._fused_sdp_choice(q, k, k, attn_mask=mask, enable_gqa=True), "?")
    except Exception as e:  # a private function: report, don't fail the benchmark
        return f"unknown ({type(e).__name__})"


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen, device="cpu").tolist()


def bench_shape(shape: str, args, device: torch.device, dtype: torch.dtype, copy_bw: float,
                emit: Callable[[dict], None]) -> None:
    model = random_native(shape, device, dtype)
    base = {"shape": shape, "weights_bytes": weight_bytes(model), "max_seq_tokens": args.max_seq_tokens}
    a, embedding = model.args, model.tok_embeddings.weight
    kv_bytes = 2 * a.n_layers * a.n_kv_heads * (args.max_seq_tokens + 1) * a.head_dim * embedding.element_size()
    # A step reads one row of an untied embedding table, not all of it; every other weight it reads in full.
    read_bytes = base["weights_bytes"] - (0 if a.tie_word_embeddings else embedding.numel() * embedding.element_size())
    floor_s, floor_kv_s = base["weights_bytes"] / copy_bw, (base["weights_bytes"] + kv_bytes) / copy_bw
    emit({"config": "copy_floor", **base, "kv_bytes": kv_bytes, "copy_bytes_per_s": copy_bw,
          "floor_ms": floor_s * 1e3, "floor_tok_per_s": 1 / floor_s, "step_read_bytes": read_bytes,
          "floor_step_read_ms": read_bytes / copy_bw * 1e3, "floor_with_kv_ms": floor_kv_s * 1e3,
          "floor_with_kv_tok_per_s": 1 / floor_kv_s, "sdpa_backend": sdpa_backend(model, args.max_seq_tokens, device)})
    prompt = random_prompt(args.prompt_tokens, model.args.vocab_size, seed=1)
    variants = [("native_eager", args.max_seq_tokens, False), ("native_graph", args.max_seq_tokens, True)]
    if device.type == "cuda":
        variants.append((f"native_graph_cache{args.short_cache_tokens}", args.short_cache_tokens, True))
    for name, max_seq, graphs in variants:
        out = {"config": name, **base, "max_seq_tokens": max_seq}
        try:
            with memory_scope(device, out):
                runner, out["setup_ms"] = time_runner_setup(model, max_seq, graphs, device)
                out["kv_bytes"] = runner.cache.kv_bytes
                out.update(time_decode(runner, prompt, args.warmup_tokens, args.tokens, device))
                out["floor_fraction"] = floor_s * 1e3 / out["step_ms"]
                if runner.graph is not None:
                    out["replay_ms"] = time_replay(runner, 50, device)
            del runner
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        emit(out)


def segments(share: float) -> tuple[int, int]:
    """(small, large) segment lengths, both >= MIN_SEGMENT_TOKENS, of the shortest period whose large share
    is within 0.001 of `share`."""
    for period in range(2 * MIN_SEGMENT_TOKENS, 2001):
        large = round(share * period)
        if min(large, period - large) >= MIN_SEGMENT_TOKENS and abs(large / period - share) <= 1e-3:
            return period - large, large
    raise ValueError(f"no segments of >= {MIN_SEGMENT_TOKENS} tokens give a large share of {share}")


def time_ead(runners: dict[Role, NativeRunner], prompt: list[int], pattern: list[Role],
             device: torch.device) -> tuple[float, list[tuple[Role, int, float]]]:
    """One EAD sequence with scripted roles: both models prefill the prompt (timed apart), then token i is
    written by pattern[i], which first feeds every token it has not seen. Returns (prefill s, steps)."""
    for r in runners.values():
        r.reset()
    t0 = now(device)
    ids = prompt + [engine_step(runners[Role.SMALL], prompt)]
    runners[Role.LARGE].feed(prompt)
    prefill_s = now(device) - t0
    steps = []
    for role in pattern:
        runner = runners[role]
        fed = ids[runner.seen:]
        t0 = now(device)
        ids.append(engine_step(runner, fed))
        steps.append((role, len(fed), now(device) - t0))
    return prefill_s, steps


def bench_ead(args, device: torch.device, dtype: torch.dtype, emit: Callable[[dict], None]) -> None:
    small_shape, large_shape = args.ead
    models = {Role.SMALL: random_native(small_shape, device, dtype, seed=1),
              Role.LARGE: random_native(large_shape, device, dtype, seed=2)}
    vocab = min(m.args.vocab_size for m in models.values())
    runners = {role: NativeRunner(m, vocab, args.max_seq_tokens, cuda_graphs=True) for role, m in models.items()}
    prompt = random_prompt(args.prompt_tokens, vocab, seed=3)
    for share in args.shares:
        n_small, n_large = segments(share)
        period = [Role.SMALL] * n_small + [Role.LARGE] * n_large
        pattern = period * max(1, round(args.ead_tokens / len(period)))
        out = {"config": "ead", "small": small_shape, "large": large_shape, "share_asked": share,
               "segment_tokens_small": n_small, "segment_tokens_large": n_large, "max_seq_tokens": args.max_seq_tokens}
        try:
            with memory_scope(device, out):
                time_ead(runners, prompt, period * 2, device)  # warm-up: every catch-up length once
                prefill_s, steps = time_ead(runners, prompt, pattern, device)
            out.update(ead_summary(steps))
            out["prefill_both_ms"] = prefill_s * 1e3
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        emit(out)


def ead_summary(steps: list[tuple[Role, int, float]]) -> dict:
    """Actual time against the ideal n_small*T_small + n_large*T_large, T the median one-token step of each."""
    t = {role: statistics.median(s for r, fed, s in steps if r is role and fed == 1) for role in Role}
    n = {role: sum(r is role for r, _, _ in steps) for role in Role}
    actual_s = sum(s for _, _, s in steps)
    ideal_s = n[Role.SMALL] * t[Role.SMALL] + n[Role.LARGE] * t[Role.LARGE]
    catchup = [(r, fed, s) for r, fed, s in steps if fed > 1]
    return {"tokens": len(steps), "large_share": n[Role.LARGE] / len(steps), "switches": len(catchup),
            "catchup_tokens": sum(fed for _, fed, _ in catchup),
            "catchup_extra_ms": sum(s - t[r] for r, _, s in catchup) * 1e3,
            "step_ms_small": t[Role.SMALL] * 1e3, "step_ms_large": t[Role.LARGE] * 1e3,
            "actual_ms": actual_s * 1e3, "ideal_ms": ideal_s * 1e3, "ideal_fraction": ideal_s / actual_s,
            "decode_tok_per_s": len(steps) / actual_s, "ideal_tok_per_s": len(steps) / ideal_s,
            "speedup_vs_large_only": len(steps) * t[Role.LARGE] / actual_s}


def bench_hf(args, device: torch.device, dtype: torch.dtype, emit: Callable[[dict], None]) -> None:
    """transformers eager on one shape: its generate (decode rate from two lengths, so prefill cancels) and
    ead's ModelRunner (the engine's hf backend)."""
    shape = args.hf_shape
    out = {"config": "hf_generate", "shape": shape, "attn_implementation": None}
    try:
        with memory_scope(device, out), torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype).eval()
            out["attn_implementation"] = hf.config._attn_implementation
            prompt = torch.tensor([random_prompt(args.prompt_tokens, hf.config.vocab_size, seed=4)], device=device)

            def generate(n: int) -> float:
                t0 = now(device)
                hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
                return now(device) - t0

            generate(4)  # warm-up
            t_one, t_many = generate(1), generate(1 + args.hf_tokens)
            out.update({"tokens": args.hf_tokens, "generate_1_ms": t_one * 1e3,
                        f"generate_{1 + args.hf_tokens}_ms": t_many * 1e3,
                        "step_ms": (t_many - t_one) / args.hf_tokens * 1e3,
                        "decode_tok_per_s": args.hf_tokens / (t_many - t_one)})
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    emit(out)
    if "error" in out:
        return
    runner_out = {"config": "hf_runner", "shape": shape}
    try:
        with memory_scope(device, runner_out):
            runner = ModelRunner(hf, hf.config.vocab_size)
            runner_out.update(time_decode(runner, prompt[0].tolist(), 2, args.hf_tokens, device))
    except Exception as e:
        runner_out["error"] = f"{type(e).__name__}: {e}"
    emit(runner_out)


def bench_compiled(shape: str, args, device: torch.device, dtype: torch.dtype,
                   emit: Callable[[dict], None]) -> None:
    """Diagnostic, not an ead feature: the decode graph captured from torch.compile'd code (elementwise ops
    fused by Inductor), to measure how much of a step the unfused small kernels cost. setup_ms includes the
    compile; prefill stays eager."""
    out = {"config": "native_graph_compiled", "shape": shape, "max_seq_tokens": args.max_seq_tokens}
    try:
        model = random_native(shape, device, dtype)
        prompt = random_prompt(args.prompt_tokens, model.args.vocab_size, seed=1)
        with memory_scope(device, out):
            runner, _ = time_runner_setup(model, args.max_seq_tokens, False, device)
            t0 = now(device)
            runner.graph = DecodeGraph(torch.compile(model, dynamic=False), runner.cache)
            out["setup_ms"] = (now(device) - t0) * 1e3
            out.update(time_decode(runner, prompt, args.warmup_tokens, args.tokens, device))
            out["replay_ms"] = time_replay(runner, 50, device)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    emit(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-14b"], choices=SHAPES)
    p.add_argument("--ead", nargs=2, default=["qwen2.5-1.5b", "qwen2.5-14b"], metavar=("SMALL", "LARGE"))
    p.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25, 0.43], help="large-token shares f")
    p.add_argument("--hf-shape", default="qwen2.5-1.5b", choices=SHAPES)
    p.add_argument("--tokens", type=int, default=256, help="timed one-token steps per decode configuration")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--ead-tokens", type=int, default=400, help="about this many tokens per EAD run")
    p.add_argument("--hf-tokens", type=int, default=32)
    p.add_argument("--max-seq-tokens", type=int, default=4096, help="static KV cache slots (ead's default)")
    p.add_argument("--short-cache-tokens", type=int, default=512)
    p.add_argument("--copy-bytes", type=int, default=1 << 30)
    p.add_argument("--skip", nargs="*", default=[], choices=["shapes", "ead", "hf"])
    p.add_argument("--compile", nargs="*", default=[], choices=SHAPES, help="shapes for native_graph_compiled")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []

    def emit(obj: dict) -> None:
        obj = {"device": device_name(device), "dtype": args.dtype, **obj}
        rows.append(obj)
        line = json.dumps(obj)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    emit({"config": "env", "torch": torch.__version__, "transformers": transformers.__version__,
          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    torch.set_grad_enabled(False)
    copy_bw = copy_bandwidth(device, args.copy_bytes)
    if "shapes" not in args.skip:
        for shape in args.shapes:
            bench_shape(shape, args, device, dtype, copy_bw, emit)
    if "ead" not in args.skip:
        bench_ead(args, device, dtype, emit)
    if "hf" not in args.skip:
        bench_hf(args, device, dtype, emit)
    if device.type == "cuda":  # last: the slowest, and a failed compile must not spoil the rest
        for shape in args.compile:
            bench_compiled(shape, args, device, dtype, emit)
    print_table(rows)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'config':<28}{'shape / f':<16}{'tok/s':>10}{'step ms':>10}{'note':>44}", file=sys.stderr)
    for r in rows:
        if r["config"] == "env":
            continue
        what = r.get("shape") or f"f={r.get('large_share', r.get('share_asked', 0)):.3f}"
        tok_s = r.get("decode_tok_per_s", r.get("floor_tok_per_s"))
        step = r.get("step_ms", r.get("floor_ms"))
        note = r.get("error", "")[:44]
        if r["config"] == "ead" and "ideal_fraction" in r:
            note = f"ideal {r['ideal_tok_per_s']:.1f} tok/s, {r['ideal_fraction']:.1%} of ideal"
        elif r["config"] == "copy_floor":
            note = f"sdpa {r['sdpa_backend']}, with kv {r['floor_with_kv_tok_per_s']:.1f} tok/s"
        elif "setup_ms" in r and "error" not in r:
            replay = f"replay {r['replay_ms']:.3f} ms, " if "replay_ms" in r else ""
            note = f"{replay}setup {r['setup_ms']:.0f} ms, peak {(r['peak_mem_bytes'] or 0) / 2**30:.1f} GiB"
        print(f"{r['config']:<28}{what:<16}{tok_s or float('nan'):>10.1f}{step or float('nan'):>10.3f}{note:>44}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
