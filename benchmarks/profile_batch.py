"""Where does a batched EAD run's time go? Every forward pass the engine makes, and how busy the GPU was.

Random weights at a pair of named shapes (see ead.bench.SHAPES), `--batch` rows routed by the paper's rule on
the synthetic entropy stream at large share `--share` (as `ead bench`), one schedule. After an untimed warm-up
run, one timed run prints:
- the forward passes per model and kind (decode, catch-up, catch-up with one-token rows merged in), with their
  padded (rows x width) buckets, whether each replayed a graph, their count, tokens and device time (CUDA events
  around each pass, read after the run: no sync added);
- wall time against the time the GPU spent in kernels (CUDA profiler): the gap is the host's.

    PYTHONPATH=. python benchmarks/profile_batch.py --pair qwen2.5-1.5b:qwen2.5-14b --batch 64 --schedule throughput
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ead.bench import _phase, random_pair, roles_for_share, run_engine, sync
from ead.config import LARGE_PHASE, EngineConfig, Role, RouterConfig
from ead.engine import BatchEngine
from ead.router import ScriptedRouter
from ead.runner import _catch_up_bucket


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="qwen2.5-1.5b:qwen2.5-14b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--share", type=float, default=0.25)
    p.add_argument("--schedule", default="throughput", choices=["exact", "throughput"])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--waves", type=int, default=1, help="rows per slot, as `ead bench --waves`: a new row takes the "
                   "slot a finished one frees")
    p.add_argument("--trace", metavar="PATH", help="also write the timed run's rounds as JSON lines: the groups' "
                   "sizes, the group chosen and why, the cost model, and each pass with its device time")
    p.add_argument("--after-single", action="store_true", help="run small-only and large-only between the warm-up "
                   "and the timed run, as `ead bench` does (the cost model then starts from their step times)")
    p.add_argument("--no-lookahead", dest="lookahead", action="store_false")
    p.add_argument("--guard-rounds", type=int, default=32, help="the throughput schedule's guard window (0 = off)")
    p.add_argument("--large-phase", type=_phase, default=LARGE_PHASE, metavar="HIGH,LOW",
                   help="the throughput schedule's phases of large rounds (default "
                        f"{','.join(map(str, LARGE_PHASE))}; off = none)")
    p.add_argument("--device", default="cuda", help="cpu: only to try the script on tiny shapes")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    small, large = args.pair.split(":")
    pair = random_pair(small, large, device, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = EngineConfig(backend="native", max_seq_tokens=args.prompt_tokens + args.tokens + 8,
                       lookahead=args.lookahead)
    engine = BatchEngine(pair, RouterConfig(), cfg, max_batch=args.batch, guard_rounds=args.guard_rounds,
                         large_phase=args.large_phase)
    engine.schedule = args.schedule
    engine.warm_up(args.prompt_tokens + args.tokens + 1)
    gen = torch.Generator().manual_seed(args.batch)
    rows = args.batch * args.waves
    prompts = [torch.randint(3, 100, (args.prompt_tokens,), generator=gen).tolist() for _ in range(rows)]

    def routers():
        return [ScriptedRouter.of_rule(roles_for_share(args.tokens, args.share, seed=1000 * args.batch + i))
                for i in range(rows)]

    run_engine(engine, prompts, args.tokens, routers())  # warm-up: graphs, kernels (run_engine resets the guard)
    if args.after_single:  # as `ead bench` runs it: small-only and large-only runs between (their step times)
        for role in (Role.SMALL, Role.LARGE):
            engine.schedule = "exact"
            run_engine(engine, prompts, args.tokens, [ScriptedRouter.of_rule([role]) for _ in prompts])
        engine.schedule = args.schedule
    passes: collections.Counter = collections.Counter()
    timed: list = []  # (key, start event, end event) per pass, on CUDA
    for role, runner in engine.runners.items():
        _count(runner, role.value, passes, timed if device.type == "cuda" else None)
    activity, kind = ((ProfilerActivity.CUDA, torch.autograd.DeviceType.CUDA) if device.type == "cuda" else
                      (ProfilerActivity.CPU, torch.autograd.DeviceType.CPU))
    rounds: list[dict] = []
    if args.trace:
        _trace(engine, rounds, timed)
    sync(device)
    with profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        r = run_engine(engine, prompts, args.tokens, routers())
        sync(device)
        wall = time.perf_counter() - t0
    busy = sum(e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
               for e in prof.key_averages() if e.device_type == kind) / 1e6
    print(f"{args.pair} batch {args.batch} f={args.share} {args.schedule}"
          f"{'' if args.lookahead else ' no lookahead'}: {r['tok_per_s']:.0f} tok/s, large share "
          f"{r['large_share']:.3f} (routed {r['routed_large_share']:.3f}), rounds small {r['rounds_small']} "
          f"large {r['rounds_large']}, catch-up tokens {r['catchup_tokens']}")
    print(f"wall {wall * 1e3:.0f} ms, kernels {busy * 1e3:.0f} ms ({busy / wall:.0%}), "
          f"host gap {max(0.0, wall - busy) * 1e3:.0f} ms (profiler on)")
    ms: collections.Counter = collections.Counter()
    for key, start, end, _ in timed:
        ms[key] += start.elapsed_time(end)
    print(f"guard: {engine.fallback_rounds} large-only rounds forced")
    print(f"{'model':<7}{'pass':<10}{'rows x width':>14}{'graph':>7}{'count':>7}{'tokens':>9}{'ms':>9}{'ms/pass':>9}")
    for key, (count, tokens) in sorted(_totals(passes).items()):
        model, kind, bucket, graphed = key
        print(f"{model:<7}{kind:<10}{f'{bucket[0]} x {bucket[1]}':>14}{'yes' if graphed else 'no':>7}"
              f"{count:>7}{tokens:>9}{ms[key]:>9.1f}{ms[key] / count:>9.2f}")
    print(f"device time in passes: {sum(ms.values()):.0f} ms")
    if args.trace:
        with open(args.trace, "w") as f:
            for r in rounds:
                r["passes"] = [[*key[:2], *key[2], start.elapsed_time(end), tokens, order]
                               for order, key, start, end, tokens in r.pop("timed")]
                f.write(json.dumps(r) + "\n")
        print(f"{len(rounds)} rounds traced to {args.trace}")


def _trace(engine: BatchEngine, rounds: list[dict], timed: list) -> None:
    """Record every round of `engine` into `rounds`: the groups' sizes and the choice (`_choose_group`), whether a
    spell of the guard or a phase forced it, the cost model it read, the host's milliseconds for the step call,
    and the passes launched during the call (a round run ahead launches in the call before its own)."""
    step, choose = engine.step, engine._choose_group

    def chosen(groups):
        t_large, per_token = engine.large_costs()
        role = choose(groups)
        rounds[-1].update(n_small=len(groups[Role.SMALL]), n_large=len(groups[Role.LARGE]), role=role.value,
                          forced=engine.forced, phase=engine.in_phase,
                          small_ms=engine.step_seconds[Role.SMALL] * 1e3, large_ms=t_large * 1e3,
                          catch_up_ms=per_token * 1e3)
        return role

    def traced():
        first = len(timed)
        rounds.append({"timed": []})
        t0 = time.perf_counter()
        out = step()
        rounds[-1]["host_ms"] = (time.perf_counter() - t0) * 1e3
        rounds[-1]["tokens"] = len(out)
        rounds[-1]["timed"] = [(first + i, *timed[first + i]) for i in range(len(timed) - first)]
        return out

    engine.step, engine._choose_group = traced, chosen


def _count(runner, model: str, passes: collections.Counter, timed: list | None) -> None:
    """Wrap the runner's two pass functions to count each call by kind and padded bucket, and on CUDA to time it
    with a pair of events (appended to `timed` with the call's key)."""
    catch_up, decode = runner._catch_up, runner._decode

    def time_it(key, run, tokens=0):
        if timed is None:
            return run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run()
        end.record()
        timed.append((key, start, end, tokens))
        return out

    def counted_catch_up(slots, ids, span, last_only=True):
        n, width = len(slots), max(map(len, ids))
        bucket = _catch_up_bucket(n, width)
        graphed = runner.graphed(n, width, all_logits=not last_only)
        kind = "verify" if not last_only else ("merged" if min(map(len, ids)) == 1 else "catch-up")
        key = (model, kind, bucket if graphed else (n, width), graphed)
        passes[(*key, sum(map(len, ids)))] += 1
        return time_it(key, lambda: catch_up(slots, ids, span, last_only), sum(map(len, ids)))

    def counted_decode(slots, tokens, span):
        key = (model, "decode", (runner.decode_rows(slots), 1), runner.use_graphs)
        passes[(*key, len(slots))] += 1
        return time_it(key, lambda: decode(slots, tokens, span), len(slots))

    runner._catch_up, runner._decode = counted_catch_up, counted_decode


def _totals(passes: collections.Counter) -> dict:
    out: dict = {}
    for (model, kind, bucket, graphed, tokens), count in passes.items():
        c, t = out.get((model, kind, bucket, graphed), (0, 0))
        out[(model, kind, bucket, graphed)] = (c + count, t + count * tokens)
    return out


if __name__ == "__main__":
    main()
