"""Where does a decode step's time go? Kernel-level profile of replayed decode graphs (CUDA only).

Random weights at a named shape (see ead.bench.SHAPES), batch 1, fused kernels; prints the CUDA kernels of
`--replays` graph replays grouped by name, with their share of the step, and the step time beside the
copy-bandwidth floor.

    PYTHONPATH=. python benchmarks/profile_step.py qwen2.5-14b
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ead.bench import copy_bandwidth, random_native
from ead.runner import NativeBatchRunner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--width", type=int, default=1, help="profile the catch-up graph of --batch rows of this many "
                   "tokens (the runner's compact path) instead of the decode step")
    p.add_argument("--unfused", action="store_true", help="eager elementwise kernels inside the graph")
    p.add_argument("--sdpa", action="store_true", help="decode attention through SDPA with a mask, not the Triton "
                   "kernel (ead.models.attention_kernel)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    model = random_native(args.shape, device, torch.bfloat16)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    runner = NativeBatchRunner(model, model.args.vocab_size, 1024, True, args.batch, fused_kernels=not args.unfused)
    if args.sdpa:  # before the first step captures its graph
        model.kernels.decode_attention = None
    slots = list(range(args.batch))
    runner.feed_many(slots, [list(range(100, 228))] * args.batch)
    for _ in range(5):
        runner.feed_many(slots, [[7]] * args.batch)
    graph = runner.graphs[(args.batch, 1, 256)]
    if args.width > 1:  # a catch-up of --width tokens a row, replayed in place (same positions each time)
        graph = runner._graph(args.batch, args.width, 256)
        graph.run_rows(torch.full((args.batch, args.width), 7, device=device),
                       (torch.arange(args.width, device=device) + 140).repeat(args.batch, 1),
                       torch.full((args.batch,), args.width, device=device), torch.arange(args.batch, device=device))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        graph.graph.replay()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 10
    floor_ms = weights / copy_bandwidth(device, 1 << 30) * 1e3
    print(f"{args.shape} batch {args.batch} width {args.width}: replay {step_ms:.3f} ms, floor {floor_ms:.3f} ms "
          f"({floor_ms / step_ms:.0%} of floor), {model.args.n_layers} layers, "
          f"{(step_ms - floor_ms) / model.args.n_layers * 1e3:.1f} us/layer over the floor")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            graph.graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"{'kernel':<90}{'calls/step':>11}{'us/step':>10}{'share':>8}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
        print(f"{e.key[:88]:<90}{e.count / args.replays:>11.1f}{e.self_device_time_total / args.replays:>10.1f}"
              f"{e.self_device_time_total / total:>8.1%}")
    print(f"kernels per step: {sum(e.count for e in events) / args.replays:.0f}, kernel time per step "
          f"{total / args.replays / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
