"""What does each pass of a batched round cost? Graph replays per (rows, width) bucket (CUDA only).

Random weights at named shapes (see ead.bench.SHAPES), `--batch` cache rows, each holding a `--prompt-tokens`
prompt: the decode step at each batch bucket, and each catch-up bucket (rows x width) the runner replays, timed
over `--replays` replays of the captured graph. A catch-up's price against the decode of the whole batch is what
the throughput schedule weighs when a small round sends tokens to the large model's next round (its catch-up)
or a large round sends riders' tokens to the small model's next round.

    PYTHONPATH=. python benchmarks/pass_costs.py --shapes qwen2.5-1.5b,qwen2.5-14b --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch

from ead.bench import random_native
from ead.runner import NativeBatchRunner


def replay_ms(graph, replays: int) -> float:
    graph.graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / replays * 1e3


def catch_up_ms(runner: NativeBatchRunner, n: int, width: int, eager: bool = False, times: int = 5) -> float:
    """Median milliseconds of `runner.feed_many` for n rows bringing `width` tokens each (one token more each
    time, so an eager pass meets a new shape as it does in a run), eagerly or as `_plan` chooses."""
    chunk_passes, out = runner.MAX_CHUNK_PASSES, []
    runner.MAX_CHUNK_PASSES = 0 if eager else chunk_passes
    base = list(runner.seen[:n])
    for k in range(times):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.feed_many(list(range(n)), [[7] * (width + k)] * n)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
        for slot, seen in enumerate(base):
            runner.truncate(slot, seen)
    runner.MAX_CHUNK_PASSES = chunk_passes
    return sorted(out)[times // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-14b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--widths", default="2,4,8,16,32,64")
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--catch-ups", default="1x300,2x300,5x138,9x143,9x161,16x128",
                   help="catch-ups too wide for one graph, rows x tokens: each timed eager and as `_plan` chunks it")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    widths = [int(w) for w in args.widths.split(",")]
    for shape in args.shapes.split(","):
        model = random_native(shape, device, torch.bfloat16)
        runner = NativeBatchRunner(model, model.args.vocab_size, 1024, True, args.batch, fused_kernels=True)
        slots = list(range(args.batch))
        runner.feed_many(slots, [list(range(100, 100 + args.prompt_tokens))] * args.batch)
        span = runner.span(args.prompt_tokens + max(widths) + 1)
        decode = {}
        b = 1
        while b <= args.batch:
            graph = runner._graph(b, 1, span)
            graph.run_rows(torch.full((b, 1), 7, device=device), torch.full((b, 1), args.prompt_tokens, device=device),
                           torch.ones(b, dtype=torch.int64, device=device))
            decode[b] = replay_ms(graph, args.replays)
            runner.cache.lengths[:] = args.prompt_tokens  # replays advance the lengths; the keys stay in place
            b *= 2
        print(f"{shape}, {args.batch} cache rows of {args.prompt_tokens} tokens, span {span}: decode "
              + ", ".join(f"{b} rows {ms:.2f} ms" for b, ms in decode.items()))
        print(f"{'rows':>5}" + "".join(f"{'w=' + str(w):>9}" for w in widths) + "   (ms per catch-up pass)")
        n = 1
        while n <= args.batch:
            cells = []
            for w in widths:
                if not runner.graphed(n, w):
                    cells.append(f"{'eager':>9}")
                    continue
                graph = runner._graph(n, w, span)
                valid = torch.full((n,), w, dtype=torch.int64, device=device)
                positions = (torch.arange(w, device=device) + args.prompt_tokens).repeat(n, 1)
                graph.run_rows(torch.full((n, w), 7, device=device), positions, valid,
                               torch.arange(n, device=device))
                cells.append(f"{replay_ms(graph, args.replays):>9.2f}")
                runner.cache.lengths[:] = args.prompt_tokens
            print(f"{n:>5}" + "".join(cells))
            cells = []
            for w in widths:  # the same rows as cache rows 0..n-1, read in place (`_catch_up_prefix`)
                if w > runner.MAX_PREFIX_WIDTH or not runner.graphed(n, w):
                    cells.append(f"{'':>9}")
                    continue
                graph = runner._graph(n, w, span, prefix=True)
                graph.run_rows(torch.full((n, w), 7, device=device), (torch.arange(w, device=device)
                               + args.prompt_tokens).repeat(n, 1), torch.full((n,), w, device=device))
                cells.append(f"{replay_ms(graph, args.replays):>9.2f}")
                runner.cache.lengths[:] = args.prompt_tokens
            print(f"{'':>5}" + "".join(cells) + "   (the same rows in place)")
            n *= 2
        print(f"an eager pass's launches, measured (calibrate_eager): {runner.calibrate_eager():.0f} padded tokens")
        print(f"{'catch-up':>10}{'eager ms':>10}{'planned ms':>12}   plan (rows x width a pass)")
        for spec in args.catch_ups.split(","):
            n, w = map(int, spec.split("x"))
            print(f"{spec:>10}{catch_up_ms(runner, n, w, eager=True):>10.2f}{catch_up_ms(runner, n, w):>12.2f}   "
                  + " + ".join(f"{len(c)} x {max(b - a for _, a, b in c)}" for plan in runner._plan([w] * n)
                               for c in plan))
        del runner, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
