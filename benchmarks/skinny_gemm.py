"""How fast are a decode step's matrix products at the batch sizes EAD's rounds run? (CUDA only.)

A decode round of M rows multiplies an (M, K) activation by each (N, K) weight of the model. Memory-bound, each
product should cost about one read of its weight. This times every product of a named shape's layer, and its LM
head, at each M, in two weight layouts: (N, K) through `F.linear` (what nn.Linear stores, the engine's today)
and (K, N) through `torch.mm` (the transpose, stored contiguous), which makes cuBLAS pick other kernels. Each
timing replays a CUDA graph of calls over enough copies of the weight to defeat the 50 MB L2 cache, so it is
the weight read, not the launch, that is timed; `GB/s` is weight bytes over time.

    PYTHONPATH=. python benchmarks/skinny_gemm.py --shapes qwen2.5-1.5b,qwen2.5-14b --rows 1,4,16,32,64
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from ead.bench import SHAPES


def products(shape: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each weight a decode step reads, per layer, and the LM head."""
    kw = SHAPES[shape][1]
    dim, inter, heads, kv = kw["hidden_size"], kw["intermediate_size"], kw["num_attention_heads"], \
        kw["num_key_value_heads"]
    head_dim = kw.get("head_dim", dim // heads)
    return {"wqkv": ((heads + 2 * kv) * head_dim, dim), "wo": (dim, heads * head_dim), "w13": (2 * inter, dim),
            "w2": (dim, inter), "head": (kw["vocab_size"], dim)}


def time_graph(fn, copies: int, repeats: int = 20) -> float:
    """Seconds per call of fn(i) for i over the copies, replayed in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats / copies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-14b")
    p.add_argument("--rows", default="1,4,16,32,64")
    p.add_argument("--l2-bytes", type=float, default=200e6, help="weight bytes per timed graph (beyond the L2)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device, dtype = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(device), torch.__version__)
    rows = [int(r) for r in args.rows.split(",")]
    for shape in args.shapes.split(","):
        print(f"\n{shape}: us per product (GB/s of weight read), F.linear on (N, K) | torch.mm on (K, N)")
        print(f"{'product':<8}{'N x K':>14}{'MB':>7}" + "".join(f"{'M=' + str(m):>26}" for m in rows))
        totals = {m: [0.0, 0.0] for m in rows}
        for name, (n, k) in products(shape).items():
            nbytes = n * k * 2
            copies = max(1, math.ceil(args.l2_bytes / nbytes))
            weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
            transposed = [w.t().contiguous() for w in weights]
            cells = []
            for m in rows:
                x = torch.randn(m, k, device=device, dtype=dtype)
                t_nk = time_graph(lambda i: F.linear(x, weights[i]), copies)
                t_kn = time_graph(lambda i: torch.mm(x, transposed[i]), copies)
                layers = 1 if name == "head" else SHAPES[shape][1]["num_hidden_layers"]
                totals[m][0] += t_nk * layers
                totals[m][1] += t_kn * layers
                cells.append(f"{t_nk * 1e6:6.1f} ({nbytes / t_nk / 1e9:4.0f}) | "
                             f"{t_kn * 1e6:6.1f} ({nbytes / t_kn / 1e9:4.0f})")
            print(f"{name:<8}{f'{n} x {k}':>14}{nbytes / 1e6:7.1f}" + "".join(f"{c:>26}" for c in cells))
            weights = transposed = []  # freed before the next product's copies
            torch.cuda.empty_cache()
        print(f"{'a step':<29}" + "".join(f"{f'{a * 1e3:.3f} | {b * 1e3:.3f} ms':>26}" for a, b in totals.values()))


if __name__ == "__main__":
    main()
