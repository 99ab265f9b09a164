"""How long does an eager catch-up (one too wide for a graph) take, and where does its time go? CUDA only.

Random weights at the 1.5B shape (`--shape`), ead's native runner with fused kernels. For each rows x tokens,
`--rows` rows read a 128-token prompt and then catch up on that many tokens in one eager pass
(`NativeBatchRunner.feed_many`), timed with a sync on each side, twice (a first call at a new shape pays what is
built per shape). Then a profile of one more pass at a new shape, by host and by GPU time: the attention backend
SDPA chose shows there (session 6 found cuDNN's, which builds an execution plan per shape; BENCHMARKS.md).

    PYTHONPATH=. python benchmarks/eager_catchup.py [--shape qwen2.5-1.5b]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ead.bench import random_native
from ead.runner import NativeBatchRunner

SHAPES = [(13, 67), (16, 128), (16, 300), (64, 129), (9, 145)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-1.5b")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model = random_native(args.shape, torch.device("cuda"), torch.bfloat16)
    runner = NativeBatchRunner(model, model.args.vocab_size, 1024, True, 64, fused_kernels=True)

    def catch_up(rows: int, width: int) -> float:
        """Milliseconds of one eager catch-up of `width` tokens for `rows` rows holding a 128-token prompt."""
        for slot in range(64):
            runner.reset(slot)
        slots = list(range(rows))
        runner.feed_many(slots, [list(range(100, 228))] * rows)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.feed_many(slots, [list(range(5, 5 + width))] * rows, with_summary=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    for rows, width in SHAPES:
        assert not runner.graphed(rows, width), "the shapes here are eager ones"
        first, second = catch_up(rows, width), catch_up(rows, width)
        print(f"{args.shape} eager catch-up {rows} x {width}: {first:.1f} ms, then {second:.1f} ms", flush=True)
    for slot in range(64):
        runner.reset(slot)
    runner.feed_many(list(range(13)), [list(range(100, 228))] * 13)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.feed_many(list(range(13)), [list(range(5, 76))] * 13, with_summary=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
