"""Several GPUs: the large model split by tensor parallelism, and the two models on GPUs of their own (issue 9).

Random weights at named shapes (ead.bench.SHAPES; bf16 on CUDA), run by the engine as `ead generate` runs them:
native backend, CUDA graphs (a split model's NCCL collectives captured inside them), prompt --prompt-tokens
random ids, --tokens new tokens per row, greedy. One question per --measure (comma-separated):

  tp-scaling  large-only decode of the LARGE shape at tp=1 and tp=--tp, at each --batch: tok/s and scaling; and
              the NCCL time in a step, timed alone: the all-reduce of one layer's (batch, dim) activation, twice per
              layer for every layer, eager and as one replayed CUDA graph, and the logits' all-gather.
  tp-ead      the HUGE shape split over --tp ranks (each rank allocates only its part): large-only against EAD with
              the SMALL shape at each --shares, scripted routing (ead.bench), and the ideal f*T_large+(1-f)*T_small
              from the same run's step times; EAD as a share of ideal.
  placement   SMALL -> LARGE with the models on two GPUs (stepped at once) against both on one GPU: batched EAD
              throughput at each --batch, scripted f = --placement-share. One process, no tensor parallelism.
  checks      the LARGE shape at tp=--tp against tp=1 (same weights) on a short prompt: max abs logit difference,
              and in bf16 both against the float32 model (the split must add no error beyond bf16's own);
              and an EAD run of the split pair, greedy and sampled with a different seed per rank, whose ranks
              must agree on every token (check_ranks_agree). Every tp-scaling and tp-ead run checks agreement too.

The script starts its --tp ranks itself (ead.launch; NCCL multicast off); rank 0 reports. One JSON object per
measurement on stdout, a Markdown table per process on stderr. Warm-up (graph capture, compilation) is timed
apart from the measured runs. On a machine without GPUs, `--device cpu --shapes tiny` runs the same code on
gloo in float32 (tests/benchmarks/test_multi_gpu.py).

    PYTHONPATH=. python benchmarks/multi_gpu.py --measure tp-scaling --batch 1,16
    PYTHONPATH=. python benchmarks/multi_gpu.py --measure tp-ead --batch 1
    PYTHONPATH=. python benchmarks/multi_gpu.py --measure placement --batch 1,16,64
    PYTHONPATH=. python benchmarks/multi_gpu.py --measure checks
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ead import launch
from ead.bench import (BenchPair, bench_pair, hf_config, random_native, random_pair, roles_for_share, run_engine,
                       shape_params, sync)
from ead.config import EngineConfig, Role, RouterConfig
from ead.engine import BatchEngine
from ead.errors import RankDivergenceError
from ead.models.kv_cache import KVCache
from ead.models.tensor_parallel import all_gather_into, check_ranks_agree, rank_device, shard
from ead.models.transformer import ModelArgs
from ead.router import ScriptedRouter
from ead.sampling import SamplingParams

MEASURES = ("tp-scaling", "tp-ead", "placement", "checks")
TINY = "tiny:tiny-large:tiny-large"
# Logits of the split model against the whole one: float32 sums in another order differ by rounding only; bf16
# rounds every partial sum of an all-reduce (and the whole model's matmuls in another order), about 2**-8 each.
TOLERANCE_REL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", default=",".join(MEASURES), help=f"comma-separated, of {', '.join(MEASURES)}")
    p.add_argument("--shapes", default="qwen2.5-1.5b:qwen2.5-14b:qwen2.5-72b",
                   help=f"SMALL:LARGE:HUGE shapes of ead.bench.SHAPES; 'tiny' = {TINY}")
    p.add_argument("--tp", type=int, default=2, help="ranks the large model is split over (one GPU each)")
    p.add_argument("--batch", default="1,16", help="batch sizes (comma-separated)")
    p.add_argument("--shares", default="0.1,0.25,0.43", help="large-token shares f for tp-ead")
    p.add_argument("--placement-share", type=float, default=0.25, help="large-token share f for placement")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--checks-dtype", choices=["bfloat16", "float32"], default=None,
                   help="dtype of the checks' logit comparison (default: the run's, bf16 on CUDA, float32 on CPU)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="every forward pass eager (to compare, or where capture fails)")
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.small, args.large, args.huge = (TINY if args.shapes == "tiny" else args.shapes).split(":")
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.shares = [float(f) for f in args.shares.split(",") if f]
    args.backend = "native"
    measures = [m for m in args.measure.split(",") if m]
    unknown = set(measures) - set(MEASURES)
    if unknown:
        p.error(f"unknown --measure {sorted(unknown)}; choose from {', '.join(MEASURES)}")
    code = 0
    split = [m for m in measures if m != "placement"]
    if split:
        code = launch.spawn(run_rank, args.tp, (args, split), args.device)
    if "placement" in measures and not code:  # in this process, once the ranks have given their GPUs back
        code = report(lambda emit: measure_placement(args, emit), args)
    return code


def run_rank(args: argparse.Namespace, measures: list[str]) -> int:
    """Every rank: the asked measurements in order (rank 0 reports)."""
    steps = {"tp-scaling": measure_tp_scaling, "tp-ead": measure_tp_ead, "checks": measure_checks}
    return report(lambda emit: [steps[m](args, emit) for m in MEASURES if m in measures], args)


def report(run: Callable[[Callable[[dict], None]], object], args: argparse.Namespace) -> int:
    """Run `run(emit)`; `emit` prints a JSON line (rank 0 only) and keeps the row for the Markdown table."""
    rows: list[dict] = []
    device = rank_device() if dist.is_initialized() else torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # ranks share the cores
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    head = {"device": name, "torch": torch.__version__, "python": platform.python_version()}

    def emit(row: dict) -> None:
        if dist.is_initialized() and dist.get_rank() > 0:
            return
        rows.append(row)
        print(json.dumps({**head, **row}), flush=True)

    torch.set_grad_enabled(False)
    run(emit)
    print(markdown(rows), file=sys.stderr)
    return 0


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(backend="native", max_seq_tokens=args.prompt_tokens + args.tokens + 8,
                        cuda_graphs=args.cuda_graphs)


def random_prompts(batch: int, vocab: int, n_tokens: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return [torch.randint(3, vocab, (n_tokens,), generator=gen).tolist() for _ in range(batch)]


def free(*devices: torch.device) -> None:
    """Give the cached memory of `devices` back (only those: touching another GPU would give it a CUDA context)."""
    gc.collect()
    for device in devices:
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.empty_cache()


# --- a. tp-scaling ---

def measure_tp_scaling(args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    device, rank, world = rank_device(), dist.get_rank(), dist.get_world_size()
    decode = {}
    for tp in (1, world):
        if tp == 1 and rank > 0:  # rank 0 runs the whole model alone
            dist.barrier()
            continue
        model = random_native(args.large, device, dtype_for(device), seed=1, world=tp)
        half = SimpleNamespace(model=model, params=shape_params(args.large), source=args.large)
        pair = BenchPair(small=half, large=half, device=device, large_tp=tp)  # large-only: the small never steps
        for batch in args.batch:
            decode[tp, batch] = large_only(pair, args, batch)
            emit({"measure": "tp_decode", "shape": args.large, "tp": tp, "batch": batch, **decode[tp, batch]})
        del model, half, pair
        free(device)
        if tp == 1:
            dist.barrier()
    for batch in args.batch:
        nccl = time_collectives(args.large, batch, device, world)
        row = {"measure": "tp_scaling", "shape": args.large, "tp": world, "batch": batch, **nccl}
        if rank == 0:
            one, split = decode[1, batch], decode[world, batch]
            row.update({"tok_per_s_tp1": one["tok_per_s"], f"tok_per_s_tp{world}": split["tok_per_s"],
                        "scaling": split["tok_per_s"] / one["tok_per_s"],
                        "step_ms_tp1": one["step_ms"], f"step_ms_tp{world}": split["step_ms"],
                        "nccl_share_of_step": (nccl["allreduce_ms_per_step"] + nccl["gather_ms_per_step"])
                        / split["step_ms"]})
        emit(row)


def large_only(pair: BenchPair, args: argparse.Namespace, batch: int) -> dict:
    """Large-only decode of `batch` rows: one untimed run (captures the graphs it needs), then the timed one."""
    engine = BatchEngine(pair, RouterConfig(), engine_config(args), max_batch=batch)
    prompts = random_prompts(batch, pair.large.model.args.vocab_size, args.prompt_tokens)
    t0 = time.perf_counter()
    run_engine(engine, prompts, args.tokens, [ScriptedRouter([Role.LARGE]) for _ in range(batch)])
    warmup_s = time.perf_counter() - t0
    timed = run_engine(engine, prompts, args.tokens, [ScriptedRouter([Role.LARGE]) for _ in range(batch)])
    return {"tok_per_s": timed["tok_per_s"], "step_ms": timed["step_ms_large"], "warmup_s": round(warmup_s, 2),
            **({"ranks_agree": timed["ranks_agree"]} if "ranks_agree" in timed else {})}


def time_collectives(shape: str, batch: int, device: torch.device, world: int, reps: int = 20) -> dict:
    """The NCCL work of one decode step of `shape` split over `world` ranks, alone: 2 all-reduces per layer of a
    (batch, 1, dim) activation, and one all-gather of (batch, V / world) logits. Eager (a launch each) and, on
    CUDA, captured in one graph and replayed, as the decode graphs run them. ms per step."""
    args = ModelArgs.from_hf_config(hf_config(shape))
    x = torch.zeros(batch, 1, args.dim, dtype=dtype_for(device), device=device)
    local = torch.zeros(batch, -(-args.vocab_size // world), dtype=dtype_for(device), device=device)
    gathered = local.new_empty((world * batch, local.shape[1]))

    def reduces() -> None:
        for _ in range(2 * args.n_layers):
            dist.all_reduce(x)

    def gather() -> None:
        all_gather_into(gathered, local)

    out = {"layers": args.n_layers, "dim": args.dim}
    for name, work in (("allreduce", reduces), ("gather", gather)):
        out[f"{name}_ms_per_step_eager"] = time_ms(work, device, reps)
        out[f"{name}_ms_per_step"] = time_ms(graphed(work, device), device, reps) if device.type == "cuda" \
            else out[f"{name}_ms_per_step_eager"]
    out["allreduce_us_each"] = out["allreduce_ms_per_step"] * 1e3 / (2 * args.n_layers)
    return out


def graphed(work: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`work` captured in a CUDA graph (warm-up on a side stream first, as ead.models.graphs does); its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            work()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        work()
    return graph.replay


def time_ms(work: Callable[[], None], device: torch.device, reps: int) -> float:
    """ms per call of `work`, after 3 warm-up calls, every rank in step."""
    for _ in range(3):
        work()
    sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        work()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


# --- b. tp-ead ---

def measure_tp_ead(args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    device, world = rank_device(), dist.get_world_size()
    t0 = time.perf_counter()
    pair = random_pair(args.small, args.huge, device, device, dtype_for(device), world)
    built_s = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in pair.large.model.parameters())
    emit({"measure": "tp_ead_model", "shape": args.huge, "tp": world, "params": pair.large.params,
          "large_weight_bytes_per_rank": weights, "build_s": round(built_s, 2),
          **({"allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2)}
             if device.type == "cuda" else {})})
    label = {"measure": "tp_ead", "pair": f"{args.small} -> {args.huge} (tp={world})"}
    bench_pair(pair, args, lambda row: emit({**label, **row}), {}, backend="native", batches=args.batch,
               shares=args.shares)
    del pair
    free(device)


# --- c. placement ---

def measure_placement(args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        emit({"measure": "placement", "error": "needs two GPUs"})
        return
    first, second = (torch.device("cuda", 0), torch.device("cuda", 1)) if device.type == "cuda" else (device, device)
    for placement, small_device in (("separate", second), ("same", first)):  # on the CPU: the same device twice
        pair = random_pair(args.small, args.large, small_device, first, dtype_for(device))
        both_at_once = small_device != first  # the engine steps the two groups concurrently (on CUDA)
        label = {"measure": "placement", "placement": placement, "small_device": str(small_device),
                 "large_device": str(first), "concurrent": both_at_once and device.type == "cuda",
                 "pair": f"{args.small} on {small_device} -> {args.large} on {first}"}
        bench_pair(pair, args, lambda row, label=label: emit({**label, **row}), {}, backend="native",
                   batches=args.batch, shares=[args.placement_share])
        del pair
        free(first, second)


# --- d. checks ---

def measure_checks(args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    device, rank, world = rank_device(), dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.checks_dtype) if args.checks_dtype else dtype_for(device)
    exact = None
    if dtype != torch.float32:  # the float32 whole model: the yardstick of how far bf16 rounding alone goes
        whole32 = random_native(args.large, device, torch.float32, seed=1)
        prompt = random_prompts(1, whole32.args.vocab_size, 32)[0]
        exact = all_logits(whole32, prompt).float()
        del whole32
        free(device)
    whole = random_native(args.large, device, dtype, seed=1)  # the same seed on every rank: the same weights
    prompt = random_prompts(1, whole.args.vocab_size, 32)[0]
    expected = all_logits(whole, prompt).float()
    part = shard(whole, rank, world)  # slices of `whole`'s tensors, copied; the replicated ones are shared
    del whole
    free(device)
    got = all_logits(part, prompt).float()
    diff, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    row = {"measure": "check_logits", "shape": args.large, "tp": world, "dtype": str(dtype).removeprefix("torch."),
           "prompt_tokens": len(prompt), "max_abs_diff": diff, "max_abs_logit": scale, "rel": diff / scale,
           "tolerance_rel": TOLERANCE_REL[dtype], "ok": diff <= TOLERANCE_REL[dtype] * scale,
           "top1_agree": (got.argmax(-1) == expected.argmax(-1)).float().mean().item()}
    if exact is not None:
        # In bf16 the split and the whole model round their partial sums differently, and on random weights (flat
        # logits) that flips top-1s. What matters is that splitting adds no error beyond bf16's own: the split
        # model must be about as close to the float32 logits as the whole bf16 model is.
        whole_err, split_err = (expected - exact).abs().max().item(), (got - exact).abs().max().item()
        row.update(whole_vs_fp32_rel=whole_err / scale, split_vs_fp32_rel=split_err / scale,
                   whole_top1_vs_fp32=(expected.argmax(-1) == exact.argmax(-1)).float().mean().item(),
                   split_top1_vs_fp32=(got.argmax(-1) == exact.argmax(-1)).float().mean().item(),
                   ok=split_err <= 1.5 * whole_err)
    emit(row)
    del expected, got, exact

    small = random_native(args.small, device, dtype, seed=0)
    pair = BenchPair(small=SimpleNamespace(model=small, params=shape_params(args.small), source=args.small),
                     large=SimpleNamespace(model=part, params=shape_params(args.large), source=args.large),
                     device=device, large_tp=world)
    batch, tokens = 4, min(args.tokens, 64)
    engine = BatchEngine(pair, RouterConfig(), engine_config(args), max_batch=batch)
    prompts = random_prompts(batch, min(small.args.vocab_size, part.args.vocab_size), 16)
    for sampling in ("greedy", "sampled"):
        params = [SamplingParams(max_new_tokens=tokens, ignore_eos=True,
                                 **({"temperature": 0.8, "seed": 100 * rank + i} if sampling == "sampled" else {}))
                  for i in range(batch)]  # sampled: each rank its own seeds, overruled by rank 0's draws
        routers = [ScriptedRouter.of_rule(roles_for_share(tokens, 0.25, seed=i)) for i in range(batch)]
        results = engine.generate_many(prompts, params, routers)
        try:
            check_ranks_agree([r.token_ids for r in results], device)
            agree, error = True, None
        except RankDivergenceError as e:
            agree, error = False, str(e)[:300]
        emit({"measure": "check_ranks_agree", "pair": f"{args.small} -> {args.large} (tp={world})",
              "sampling": sampling, "rows": batch, "tokens": sum(len(r.token_ids) for r in results),
              "large_share": sum(r.stats.tokens_large for r in results) / sum(len(r.token_ids) for r in results),
              "cuda_graphs": args.cuda_graphs and device.type == "cuda", "ok": agree,
              **({"error": error} if error else {})})
    del engine, pair, part, small
    free(device)


def all_logits(model, prompt: list[int]) -> torch.Tensor:
    """(T, V) float32 logits after every prompt token, one eager forward over an empty cache."""
    weight = model.tok_embeddings.weight
    cache = KVCache.for_model(model.args, 1, len(prompt), weight.dtype, weight.device)
    tokens = torch.tensor([prompt], device=weight.device)
    return model(tokens, cache.next_positions(1, len(prompt)), cache)[0].float()


# --- the table ---

def markdown(rows: list[dict]) -> str:
    lines = []
    scaling = [r for r in rows if r["measure"] == "tp_scaling"]
    if scaling:
        tp = scaling[0]["tp"]
        lines += [(f"| shape | batch | tok/s tp=1 | tok/s tp={tp} | scaling | step ms tp=1 | step ms tp={tp} | "
                   "all-reduce ms/step (graph, eager) | all-gather ms/step | NCCL share of step |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in scaling:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['tok_per_s_tp1']:.1f} | {r[f'tok_per_s_tp{tp}']:.1f} | "
                         f"{r['scaling']:.2f}x | {r['step_ms_tp1']:.2f} | {r[f'step_ms_tp{tp}']:.2f} | "
                         f"{r['allreduce_ms_per_step']:.3f}, {r['allreduce_ms_per_step_eager']:.3f} | "
                         f"{r['gather_ms_per_step']:.3f} | {r['nccl_share_of_step']:.1%} |")
        lines.append("")
    engine_rows = [r for r in rows if r["measure"] in ("tp_ead", "placement") and "mode" in r]
    if engine_rows:
        lines += [("| pair | batch | mode | f | tok/s | ideal tok/s | EAD of ideal | vs large-only | "
                   "step ms small/large | ranks agree | peak GiB |"),
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in engine_rows:
            ideal = f"{r['ideal_tok_per_s']:.1f}" if "ideal_tok_per_s" in r else ""
            of = f"{r['of_ideal']:.1%}" if "of_ideal" in r else ""
            steps = "/".join(f"{r[k]:.2f}" if r.get(k) is not None else "-"
                             for k in ("step_ms_small", "step_ms_large"))
            lines.append(f"| {r['pair']} | {r['batch']} | {r['mode']} | {r['large_share']:.3f} | {r['tok_per_s']:.1f} "
                         f"| {ideal} | {of} | {r['vs_large_only']:.2f}x | {steps} | {r.get('ranks_agree', '')} | "
                         f"{r.get('peak_mem_gib', '')} |")
        lines.append("")
    for r in rows:
        if r["measure"].startswith("check") or "error" in r:
            lines.append("- " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
