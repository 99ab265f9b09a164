"""`ead bench`: how fast tokens come out, for single models and for EAD pairs, at several batch sizes.

Random weights at the real shapes of named models (speed does not depend on the values, and nothing is
downloaded), or the real default pair with `--models default`. One run prints, for each shape: the copy-
bandwidth floor (every weight read once per step) and ead's batch-1 decode; and for the pair, at each batch
size: transformers' eager `generate` (large model, batch 1), ead small-only, large-only, and EAD at each
large share f under each `--schedule` (exact; throughput, where large rounds carry the rows in small mode too and
the realised large share exceeds the routed f; batch > 1 only, at batch 1 it is exact), with the ideal
f*T_large + (1-f)*T_small at the routed f, T the time per step of the same run's small-only and large-only
configurations at that batch size (host work included, as in EAD's), each row's time per token (latency), and
the peak device memory of each configuration. JSON lines go to stdout (and --out), Markdown tables to stderr.

EAD here is scripted: the paper's rule (window 5, d_min 10) applied to a synthetic entropy stream, one stream
per row, with tau set so that the rule gives the large model the asked share. Rows therefore switch at their
own times, as in real use, and the engine does all its real work (catch-up, both groups, the routers' one
sync per step); only the signal that triggers a switch is replayed rather than read from random weights.

Speculation (real models only: `--models default`, or `--small`/`--large`; `ead.bench_speculation`): at each
batch size, on GSM8K test prompts, large-only, speculative decoding (`--gamma`, and with `--draft-confidence`
the adaptive draft length), and EAD and hybrid at each share f with the same scripted roles, with the
acceptance rate (accepted / drafted), accepted draft tokens and tokens per large-model pass, and whether the
speculative rows wrote large-only's text; at batch 1 with transformers models (backends hf and native),
transformers' own `generate`, plain and assisted (`assistant_model`), as the anchor. Random weights get no
such rows: acceptance would only measure how two random models agree.
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
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ead.config import LARGE_PHASE, SCHEDULES, EngineConfig, Role, RouterConfig, SpeculativeConfig
from ead.errors import ConfigError
from ead.router import Router, ScriptedRouter

QWEN = dict(rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6)
LLAMA32 = dict(rope_theta=5e5, max_position_embeddings=131072, rms_norm_eps=1e-5,
               rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192))
LLAMA31 = {**LLAMA32, "rope_scaling": {**LLAMA32["rope_scaling"], "factor": 8.0}}
SHAPES = {  # (family, config): the published configs' shapes
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                   tie_word_embeddings=True, **QWEN)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   tie_word_embeddings=True, **QWEN)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                 tie_word_embeddings=False, **QWEN)),
    "qwen2.5-14b": ("qwen2", dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                                  num_key_value_heads=8, intermediate_size=13824, vocab_size=152064,
                                  tie_word_embeddings=False, **QWEN)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                   tie_word_embeddings=True, head_dim=64, **LLAMA32)),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                   tie_word_embeddings=True, head_dim=128, **LLAMA32)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                   tie_word_embeddings=False, **LLAMA31)),
    # 145 GB of bf16 weights: split over 2 GPUs at least (--large-tp 2, about 74 GB per rank).
    "qwen2.5-72b": ("qwen2", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                  num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                                  tie_word_embeddings=False, **QWEN)),
    "llama-3.1-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                    num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                                    tie_word_embeddings=False, **LLAMA31)),
    "tiny": ("qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=512, tie_word_embeddings=True, **QWEN)),
    "tiny-large": ("qwen2", dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=256, vocab_size=512,
                                 tie_word_embeddings=False, **QWEN)),
}


def hf_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    family, kw = SHAPES[shape]
    return Qwen2Config(**kw, use_sliding_window=False) if family == "qwen2" else LlamaConfig(**kw)


def random_native(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0, world: int = 1):
    """ead's decoder at `shape` with random weights made on `device` in `dtype` (a 14B model never touches host
    memory, and never exists in float32). `world` > 1: one rank's part of the model split over `world` ranks of
    the process group (ead.models.tensor_parallel); only that part is ever allocated, so each GPU of a 72B model
    holds its half."""
    from ead.models.tensor_parallel import build_rank_model
    from ead.models.transformer import ModelArgs, Transformer, rope_inv_freq

    args = ModelArgs.from_hf_config(hf_config(shape))
    if world > 1:
        model = build_rank_model(args, world)
        args = model.args  # per rank
    else:
        with torch.device("meta"):
            model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    if args.tie_word_embeddings and world == 1:  # to_empty gives each module its own tensor
        model.output.weight = model.tok_embeddings.weight
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    model.inv_freq = rope_inv_freq(args).to(device)  # float32, as load_native keeps it
    return model.eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors counted once


def shape_params(shape: str) -> int:
    """Parameters of the whole model at `shape` (counted on the meta device: nothing allocated)."""
    from ead.models.transformer import ModelArgs, Transformer

    with torch.device("meta"):
        return n_params(Transformer(ModelArgs.from_hf_config(hf_config(shape))))


@dataclass
class BenchPair:
    """What BatchEngine needs of a ModelPair, for random-weight models: no tokenizer, no end of sequence."""

    small: SimpleNamespace
    large: SimpleNamespace
    device: torch.device
    eos_token_ids: frozenset = field(default_factory=frozenset)
    large_tp: int = 1

    def decode(self, token_ids: list[int]) -> str:
        return ""


def random_pair(small_shape: str, large_shape: str, small_device: torch.device, large_device: torch.device,
                dtype: torch.dtype, large_tp: int = 1) -> BenchPair:
    """Random-weight models at two shapes; `large_tp` > 1: this rank's part of the large model on `large_device`
    (the rank's own), the small model whole."""
    small = random_native(small_shape, small_device, dtype, seed=0)
    large = random_native(large_shape, large_device, dtype, seed=1, world=large_tp)
    return BenchPair(small=SimpleNamespace(model=small, params=n_params(small), source=small_shape),
                     large=SimpleNamespace(model=large, params=shape_params(large_shape), source=large_shape),
                     device=large_device, large_tp=large_tp)


# --- the synthetic entropy stream and the scripted router ---

def entropy_stream(n: int, seed: int) -> list[float]:
    """Per-token entropy in bits shaped like the default pair's small model (median about 0.01 bits, 90th
    percentile about 1 bit): mostly near zero, with bursts of hard tokens (a two-state Markov chain)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 2, generator=gen).tolist()
    hard, out = False, []
    for a, b in u:
        hard = (a < 0.06) if not hard else (a < 0.85)  # bursts of about 7 tokens, about 7% of tokens
        out.append(0.5 + 3.0 * b if hard else 0.02 * b)
    return out


def paper_roles(stream: list[float], tau: float) -> list[Role]:
    """The role that writes each token when the paper's rule reads `stream` (token i's role comes from the
    entropies of tokens before it)."""
    router, roles = Router(RouterConfig(threshold_bits=tau)), []
    for bits in stream:
        roles.append(router.active)
        router.observe(bits)
    return roles


def roles_for_share(n: int, share: float, seed: int) -> list[Role]:
    """Roles for n tokens with a large share close to `share`: tau found by bisection on the stream."""
    stream = entropy_stream(n, seed)
    lo, hi = 0.0, 4.0
    for _ in range(40):
        tau = (lo + hi) / 2
        f = sum(r is Role.LARGE for r in paper_roles(stream, tau)) / n
        lo, hi = (tau, hi) if f > share else (lo, tau)
    return paper_roles(stream, (lo + hi) / 2)


# --- measuring ---

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_engine(engine) -> None:
    """Wait for every device the engine's models sit on (two, when they are placed apart)."""
    for device in {getattr(r, "device", engine.pair.device) for r in engine.runners.values()} | {engine.pair.device}:
        sync(torch.device(device))


@contextlib.contextmanager
def memory_scope(device: torch.device, out: dict) -> Iterator[None]:
    """Peak bytes allocated inside the block, and the cudaMalloc calls and reserved bytes it added."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_stats(device)
    yield
    if device.type == "cuda":
        after = torch.cuda.memory_stats(device)
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["cuda_mallocs"] = after.get("segment.all.allocated", 0) - before.get("segment.all.allocated", 0)
        out["reserved_growth_bytes"] = after.get("reserved_bytes.all.current", 0) - \
            before.get("reserved_bytes.all.current", 0)


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy; median of 20."""
    src = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times)


def run_engine(engine, prompts: list[list[int]], tokens: int, routers: list) -> dict:
    """Every prompt to `tokens` new tokens through `engine`; throughput, per-row latency, per-model step times."""
    from ead.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    before = (dict(engine.rounds), dict(engine.rows_stepped), engine.ride_along_tokens, engine.fallback_rounds,
              engine.lookahead_rounds, engine.lookahead_discarded)
    engine.reset_guard()
    sync_engine(engine)
    t0 = time.perf_counter()
    results = engine.generate_many(prompts, params, routers)
    sync_engine(engine)
    seconds = time.perf_counter() - t0
    checked = {}
    if engine.pair.large_tp > 1:  # every rank must have written the same tokens (raises RankDivergenceError)
        from ead.models.tensor_parallel import check_ranks_agree

        check_ranks_agree([r.token_ids for r in results], engine.pair.device)
        checked = {"ranks_agree": True}
    steps = [s for r in results for s in r.trace.steps]
    one = {role: [s.step_ms for s in steps if s.role is role and s.fed_tokens == 1] for role in Role}
    n_large = sum(s.role is Role.LARGE for s in steps)
    t_large, per_token = engine.large_costs()
    ride_along = engine.ride_along_tokens - before[2]  # large tokens of rows routed to the small model
    rounds = {f"rounds_{role.value}": engine.rounds[role] - before[0][role] for role in Role}
    rows = {f"rows_per_round_{role.value}": round((engine.rows_stepped[role] - before[1][role]) /
                                                  max(1, rounds[f"rounds_{role.value}"]), 2) for role in Role}
    return {**rounds, **rows,
            "rows": len(prompts), "tokens": len(steps), "seconds": seconds, "tok_per_s": len(steps) / seconds,
            "large_share": n_large / len(steps), "routed_large_share": (n_large - ride_along) / len(steps),
            "ride_along_tokens": ride_along, "guard_rounds": engine.fallback_rounds - before[3],
            "rounds_ahead": engine.lookahead_rounds - before[4],
            "ahead_discarded": engine.lookahead_discarded - before[5],
            "row_ms_per_token": statistics.mean(r.stats.seconds / len(r.token_ids) * 1e3 for r in results),
            "step_ms_small": statistics.median(one[Role.SMALL]) if one[Role.SMALL] else None,
            "step_ms_large": statistics.median(one[Role.LARGE]) if one[Role.LARGE] else None,
            # the throughput schedule's cost model after the run (BatchEngine.large_costs, step_seconds)
            "model_large_ms": t_large * 1e3, "model_catch_up_ms_per_token": per_token * 1e3,
            "model_small_ms": engine.step_seconds[Role.SMALL] * 1e3,
            "switches": sum(r.stats.switches for r in results),
            "catchup_tokens": sum(r.stats.catchup_tokens for r in results), **checked}


def bench_pair(pair, args, emit: Callable[[dict], None], label: dict, backend: str | None = None,
               batches: list[int] | None = None, shares: list[float] | None = None) -> None:
    """small-only, large-only and EAD at each share and schedule (`args.schedule`, default exact only), at each
    batch size, through one BatchEngine per size."""
    from ead.engine import BatchEngine

    cfg = EngineConfig(backend=backend or args.backend, max_seq_tokens=args.prompt_tokens + args.tokens + 8,
                       cuda_graphs=args.cuda_graphs, lookahead=getattr(args, "lookahead", True))
    vocab = min(_vocab(pair.small.model), _vocab(pair.large.model))
    for batch in args.batch if batches is None else batches:
        gen = torch.Generator().manual_seed(batch)
        waves = getattr(args, "waves", 1)
        prompts = [torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist()
                   for _ in range(batch * waves)]
        out = {"config": "engine", **label, "batch": batch}
        try:
            with memory_scope(pair.device, out):
                engine = BatchEngine(pair, RouterConfig(), cfg, max_batch=batch,
                                     guard_rounds=getattr(args, "guard_rounds", 32),
                                     large_phase=getattr(args, "large_phase", LARGE_PHASE))
                t0 = time.perf_counter()
                engine.warm_up(args.prompt_tokens + args.tokens + 1)
                out["capture_s"] = round(time.perf_counter() - t0, 2)
                modes = {"small_only": ([[Role.SMALL]] * len(prompts), "exact"),
                         "large_only": ([[Role.LARGE]] * len(prompts), "exact")}
                for f in args.shares if shares is None else shares:
                    scripts = [roles_for_share(args.tokens, f, seed=1000 * batch + i) for i in range(len(prompts))]
                    for schedule in getattr(args, "schedule", ["exact"]):
                        if schedule == "exact" or batch > 1:  # alone, a row's rounds are the same either way
                            modes[f"ead_f{f:g}" + ("" if schedule == "exact" else f"_{schedule}")] = (scripts, schedule)
                # warm-up, untimed: captures the graphs and compiles the kernels this batch size needs (every
                # span the rows grow through, catch-up widths of typical switches, and of each schedule's rounds)
                for schedule in sorted({schedule for _, schedule in modes.values()}):
                    engine.schedule = schedule
                    run_engine(engine, prompts[:batch], args.tokens,
                               [ScriptedRouter.of_rule(roles_for_share(args.tokens, 0.3, seed=7 + i))
                                for i in range(batch)])
                sync(pair.device)
                timed = {}
                for mode, (scripts, schedule) in modes.items():
                    engine.schedule = schedule  # read each round; the rows and routers are new in each run
                    with memory_scope(pair.device, timed.setdefault(mode, {"schedule": schedule})):
                        routers = [ScriptedRouter.of_rule(s) for s in scripts]
                        timed[mode].update(run_engine(engine, prompts, args.tokens, routers))
                del engine
            # Seconds per step of all rows, host work included, from the single-model runs of this batch size.
            t_small, t_large = (batch / timed[m]["tok_per_s"] for m in ("small_only", "large_only"))
            for mode, r in timed.items():
                row = {**out, "mode": mode, **r}
                if mode.startswith("ead"):  # the ideal of the routed share (ride-along tokens cost no extra round)
                    f = r["routed_large_share"]
                    row["ideal_tok_per_s"] = batch / (f * t_large + (1 - f) * t_small)
                    row["of_ideal"] = row["tok_per_s"] / row["ideal_tok_per_s"]
                row["vs_large_only"] = r["tok_per_s"] / timed["large_only"]["tok_per_s"]
                emit(row)
        except Exception as e:  # one failed size (out of memory, say) must not lose the others
            emit({**out, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        gc.collect()
        if pair.device.type == "cuda":
            torch.cuda.empty_cache()


def bench_speculation(pair, args, emit: Callable[[dict], None], label: dict, backend: str) -> None:
    """Large-only, speculative and, at each share, scripted EAD and hybrid on GSM8K prompts, at each batch size
    (see the module docstring); transformers' plain and assisted generate at batch 1 for transformers models."""
    from ead import bench_speculation as spec

    g = args.gamma
    for batch in args.batch:
        out = {"config": "speculation", **label, "batch": batch}
        try:
            prompts = spec.gsm8k_prompts(pair, max(batch, args.problems))
            cfg = EngineConfig(backend=backend, max_seq_tokens=max(map(len, prompts)) + args.tokens + 8,
                               cuda_graphs=args.cuda_graphs, lookahead=getattr(args, "lookahead", True))
            modes = [spec.SpeculationMode("large_only"),
                     spec.SpeculationMode(f"speculative_g{g}", "speculative", speculative=SpeculativeConfig(g))]
            if args.draft_confidence is not None:
                c = args.draft_confidence
                modes.append(spec.SpeculationMode(f"speculative_g{g}_c{c:g}", "speculative",
                                                  speculative=SpeculativeConfig(g, c)))
            for f in args.shares:  # the EAD rows' scripted roles, for EAD and for hybrid alike
                scripts = tuple(tuple(roles_for_share(args.tokens, f, seed=1000 * batch + i))
                                for i in range(len(prompts)))
                modes += [spec.SpeculationMode(f"ead_f{f:g}", scripts=scripts),
                          spec.SpeculationMode(f"hybrid_f{f:g}_g{g}", "hybrid", speculative=SpeculativeConfig(g),
                                               scripts=scripts)]
            rows = spec.run_modes(pair, prompts, args.tokens, modes, cfg, batch, out, emit)
            if batch == 1 and spec.is_transformers(pair.large.model):
                for row in spec.hf_generate_rows(pair, prompts, args.tokens):
                    emit({**out, **row, "vs_large_only": row["tok_per_s"] / rows[0]["tok_per_s"]})
        except Exception as e:  # one failed size (out of memory, say) must not lose the others
            emit({**out, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        gc.collect()


def bench_shape(shape: str, args, device: torch.device, dtype: torch.dtype, copy_bw: float,
                emit: Callable[[dict], None]) -> None:
    """Floor and batch-1 decode of one shape (small-only EAD of the model with itself)."""
    model = random_native(shape, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    emit({"config": "floor", "shape": shape, "params": n_params(model), "weights_bytes": weights,
          "floor_ms": weights / copy_bw * 1e3, "floor_tok_per_s": copy_bw / weights})
    half = SimpleNamespace(model=model, params=n_params(model), source=shape)
    pair = BenchPair(small=half, large=half, device=device)
    bench_pair(pair, args, lambda row: emit({**row, "floor_fraction": row.get("tok_per_s", 0) * weights / copy_bw})
               if row.get("mode") == "small_only" or "error" in row else None, {"shape": shape}, batches=[1], shares=[])
    del model, pair, half
    gc.collect()


def bench_hf_generate(shape: str, args, device: torch.device, dtype: torch.dtype, emit: Callable[[dict], None]) -> None:
    """transformers eager `generate` at batch 1; the decode rate from two lengths, so prefill cancels."""
    from transformers import AutoModelForCausalLM

    out = {"config": "hf_generate", "shape": shape, "batch": 1}
    try:
        with memory_scope(device, out), torch.device(device):
            hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype).eval()
            prompt = torch.randint(3, hf.config.vocab_size, (1, args.prompt_tokens), device=device)

            def generate(n: int) -> float:
                sync(device)
                t0 = time.perf_counter()
                hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
                sync(device)
                return time.perf_counter() - t0

            generate(4)
            t_one, t_many = generate(1), generate(1 + args.hf_tokens)
            out.update({"tokens": args.hf_tokens, "tok_per_s": args.hf_tokens / (t_many - t_one),
                        "step_ms": (t_many - t_one) / args.hf_tokens * 1e3})
        del hf
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    emit(out)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _vocab(model) -> int:
    return model.args.vocab_size if hasattr(model, "args") else model.config.vocab_size


def _phase(text: str) -> tuple[float, float] | None:
    """--large-phase HIGH,LOW, or off."""
    if text == "off":
        return None
    try:
        high, low = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give two fractions HIGH,LOW, e.g. 0.5,0.2; got {text!r}") from None
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"need 0 <= LOW <= HIGH <= 1, got {text!r}")
    return high, low


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure decode speed: single models, and EAD pairs at several batch sizes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=["random", "default"], default="random",
                   help="random weights at named shapes (default), or the real default pair")
    p.add_argument("--shapes", default="", help=f"comma-separated shapes for single-model rows ({', '.join(SHAPES)})")
    p.add_argument("--pair", default="qwen2.5-1.5b:qwen2.5-14b", help="SMALL:LARGE shapes for the EAD rows ('' = none)")
    p.add_argument("--shares", default="0.1,0.25,0.43", help="large-token shares f for the scripted EAD rows")
    p.add_argument("--batch", default="1,4,16,64", help="batch sizes for the pair")
    p.add_argument("--schedule", default="exact",
                   help="comma-separated schedules for the EAD rows, side by side: exact (each row as alone), "
                        "throughput (large rounds carry every row; batch > 1), e.g. exact,throughput")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--waves", type=int, default=1,
                   help="prompts per batch slot: WAVES x batch rows go through batch slots, each new row taking the "
                        "slot a finished one frees (a server's steady state; the guard keeps what it learnt)")
    p.add_argument("--hf-tokens", type=int, default=32, help="tokens for transformers' generate (0 = skip)")
    p.add_argument("--backend", default="auto",
                   help="engine backend (auto = native on CUDA); with --models default a comma-separated list runs "
                        "each in turn, e.g. llamacpp,hf. Random weights always run on ead's own decoder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--small", default=None, help="a real small model (hub id, folder or .gguf), with --large: "
                   "instead of --models default")
    p.add_argument("--large", default=None, help="the real large model, with --small")
    p.add_argument("--gamma", type=int, default=4,
                   help="draft tokens per large pass for the speculative and hybrid rows of real models (0 = none)")
    p.add_argument("--draft-confidence", type=float, default=0.5,
                   help="also a speculative row with this adaptive draft length (a negative value: no such row)")
    p.add_argument("--problems", type=int, default=4,
                   help="GSM8K test prompts for the speculation rows (at least the batch size)")
    p.add_argument("--cache-dir", default=None, help="for --models default")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run every forward pass eagerly (to compare, or where capture fails)")
    p.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                   help="read each round before launching the next (EngineConfig.lookahead), to time what it saves")
    p.add_argument("--guard-rounds", type=int, default=32,
                   help="the throughput schedule's guard window in rounds (BatchEngine.guard_rounds; 0 = off)")
    p.add_argument("--large-phase", type=_phase, default=LARGE_PHASE, metavar="HIGH,LOW",
                   help="the throughput schedule's phases of large rounds (BatchEngine.large_phase; default "
                        f"{','.join(map(str, LARGE_PHASE))}; off = none)")
    from ead.cli import add_parallel_args

    add_parallel_args(p)
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import transformers

    from ead.pair import place_models

    tp = args.large_tp or 1  # under tensor parallelism every rank runs this, on its own device; rank 0 reports
    small_device, device = place_models(args.device, args.small_device, args.large_device, tp)
    first_rank = tp == 1 or torch.distributed.get_rank() == 0
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.shares = [float(x) for x in args.shares.split(",") if x]
    args.batch = [int(x) for x in args.batch.split(",") if x]
    args.schedule = [x for x in args.schedule.split(",") if x]
    if not args.schedule or not set(args.schedule) <= set(SCHEDULES):
        raise ConfigError(f"--schedule takes a comma-separated list of {', '.join(SCHEDULES)}, got {args.schedule}")
    if args.draft_confidence is not None and args.draft_confidence < 0:
        args.draft_confidence = None
    if (args.small is None) != (args.large is None):
        raise ConfigError("pass both --small and --large (real models), or neither")
    if args.waves < 1:
        raise ConfigError(f"--waves must be at least 1 (prompts per batch slot), got {args.waves}")
    rows = []

    def emit(obj: dict | None) -> None:
        if obj is None or not first_rank:
            return
        rows.append(obj)
        line = json.dumps({"device": device_name(device), "dtype": str(dtype).removeprefix("torch."), **obj})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    emit({"config": "env", "torch": torch.__version__, "transformers": transformers.__version__,
          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "threads": torch.get_num_threads(), "argv": sys.argv[1:]})
    torch.set_grad_enabled(False)
    if args.models == "default" or args.small is not None:
        from ead.cli import cache_dir
        from ead.pair import load_pair

        for backend in args.backend.split(","):  # e.g. llamacpp,hf: side by side in one run
            pair = load_pair(args.small, args.large, device=args.device, dtype=str(dtype).removeprefix("torch."),
                             cache_root=cache_dir(args), backend=backend, small_device=args.small_device,
                             large_device=args.large_device, large_tp=tp)
            name = "default pair" if args.small is None else f"{args.small} -> {args.large}"
            bench_pair(pair, args, emit, {"pair": f"{name}, {backend}"}, backend=backend)
            if args.gamma and tp == 1:  # speculation runs on one device so far (BatchEngine refuses a sync)
                bench_speculation(pair, args, emit, {"pair": f"{name}, {backend}"}, backend)
            del pair
            gc.collect()
    else:
        copy_bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
        emit({"config": "copy_bandwidth", "bytes_per_s": copy_bw})
        for shape in [s for s in args.shapes.split(",") if s]:
            bench_shape(shape, args, device, dtype, copy_bw, emit)
        if args.pair:
            small_shape, large_shape = args.pair.split(":")
            if args.hf_tokens and tp == 1:
                bench_hf_generate(large_shape, args, device, dtype, emit)
            pair = random_pair(small_shape, large_shape, small_device, device, dtype, tp)
            label = f"{small_shape} -> {large_shape}" + (f" (large split over {tp} ranks)" if tp > 1 else "")
            bench_pair(pair, args, emit, {"pair": label})
            if args.gamma:
                emit({"config": "speculation", "pair": label, "skipped": "random weights: acceptance would only "
                      "measure how two random models agree; speculative and hybrid rows need real models "
                      "(--models default, or --small/--large)"})
    print(markdown(rows), file=sys.stderr)
    return 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def _round_notes(r: dict) -> str:
    """The rounds column's note: rounds a spell of the guard forced, rounds run ahead (and discarded)."""
    notes = [f"{g} by the guard"] if (g := r.get("guard_rounds")) else []
    if r.get("rounds_ahead") or r.get("ahead_discarded"):
        notes.append(f"{r['rounds_ahead']} ahead, {r['ahead_discarded']} discarded")
    return f" ({'; '.join(notes)})" if notes else ""


def markdown(rows: list[dict]) -> str:
    """The tables for BENCHMARKS.md."""
    lines = ["| shape | params | floor tok/s | ead batch 1 tok/s | step ms | of floor | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    floors = {r["shape"]: r for r in rows if r["config"] == "floor"}
    for r in rows:
        if r["config"] == "engine" and "shape" in r and "tok_per_s" in r:
            fl = floors[r["shape"]]
            lines.append(f"| {r['shape']} | {fl['params'] / 1e9:.2f}B | {fl['floor_tok_per_s']:.0f} | "
                         f"{r['tok_per_s']:.1f} | {r['step_ms_small']:.2f} | {r['floor_fraction']:.0%} | "
                         f"{r.get('peak_mem_gib', '')} |")
    lines += ["", "| pair | batch | mode | f (routed) | tok/s | ideal tok/s | of ideal | vs large-only | "
                  "row ms/token | switches | rounds small/large | rows per round | peak GiB | cudaMallocs |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["config"] == "hf_generate" and "tok_per_s" in r:
            lines.append(f"| {r['shape']} (transformers generate, eager) | 1 | large_only | 1 | {r['tok_per_s']:.1f} "
                         f"| | | | {r['step_ms']:.1f} | | | | {r.get('peak_mem_gib', '')} | |")
        if r["config"] == "engine" and "pair" in r and "mode" in r:
            ideal = f"{r['ideal_tok_per_s']:.1f}" if "ideal_tok_per_s" in r else ""
            of = f"{r['of_ideal']:.1%}" if "of_ideal" in r else ""
            f = f"{r['large_share']:.3f}"
            if r.get("ride_along_tokens"):  # realised (routed)
                f += f" ({r['routed_large_share']:.3f})"
            lines.append(f"| {r['pair']} | {r['batch']} | {r['mode']} | {f} | {r['tok_per_s']:.1f} "
                         f"| {ideal} | {of} | {r['vs_large_only']:.2f}x | {r['row_ms_per_token']:.2f} | "
                         f"{r['switches']} | {r['rounds_small']}/{r['rounds_large']}{_round_notes(r)} | "
                         f"{r['rows_per_round_small']}/{r['rows_per_round_large']} | {r.get('peak_mem_gib', '')} | "
                         f"{r.get('cuda_mallocs', '')} |")
        if "error" in r and r["config"] != "speculation":
            lines.append(f"| {r.get('pair', r.get('shape'))} | {r.get('batch', '')} | {r['config']} error: "
                         f"{r['error'][:80]} | | | | | | | | | | | |")
    speculation = [r for r in rows if r["config"] == "speculation"]
    if speculation:
        from ead.bench_speculation import markdown as speculation_table

        lines += ["", *(f"Speculation rows skipped for {r['pair']}: {r['skipped']}" for r in speculation
                        if "skipped" in r)]
        if any("skipped" not in r for r in speculation):
            lines.append(speculation_table([r for r in speculation if "skipped" not in r]))
    return "\n".join(lines)
