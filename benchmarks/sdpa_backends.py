"""SDPA's backends on the attention of eager catch-ups: cuDNN's, the memory-efficient kernel (grouped key/value
heads given as such, which it refuses, expanded to every query head, or each group's query heads folded into
one head's queries, as `ead.models.transformer.attend` runs it) and the math backend, each timed at a
shape it has already seen (mean of 5 calls after one), with its largest error against float32. CUDA only.

Shapes (rows, new tokens, keys, query heads, key/value heads, head dim 128) of 1.5B- and 14B-shape catch-ups,
an additive mask hiding half the keys. The time of a first call at a new shape, where cuDNN builds its plan, is
`benchmarks/eager_catchup.py`'s.

    PYTHONPATH=. python benchmarks/sdpa_backends.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ead.models.transformer import fold_mask

SHAPES = [(13, 67, 256, 12, 2), (64, 129, 512, 12, 2), (48, 200, 512, 40, 8), (9, 145, 256, 40, 8)]
BACKENDS = {"cudnn": (SDPBackend.CUDNN_ATTENTION, False), "efficient": (SDPBackend.EFFICIENT_ATTENTION, False),
            "efficient, heads expanded": (SDPBackend.EFFICIENT_ATTENTION, True),
            "efficient, query heads folded (ead's)": (SDPBackend.EFFICIENT_ATTENTION, "fold"),
            "math": (SDPBackend.MATH, False)}


def mean_ms(fn, n: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    for rows, tokens, keys, heads, kv_heads in SHAPES:
        q = torch.randn(rows, heads, tokens, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(rows, kv_heads, keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = torch.zeros(rows, 1, tokens, keys, device="cuda", dtype=torch.bfloat16)
        mask[..., keys // 2:] = float("-inf")
        groups = heads // kv_heads
        folded = fold_mask(mask, groups)
        ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(groups, 1),
                                             v.float().repeat_interleave(groups, 1), attn_mask=mask.float())
        cells = []
        for name, (backend, expand) in BACKENDS.items():
            def run(backend=backend, expand=expand):
                with sdpa_kernel([backend]):
                    if expand == "fold":  # the mask folded once per forward pass, outside the timed layer
                        return F.scaled_dot_product_attention(q.reshape(rows, kv_heads, -1, 128), k, v,
                                                              attn_mask=folded).reshape(q.shape)
                    if expand:
                        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                                              v.repeat_interleave(groups, 1), attn_mask=mask)
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            try:
                err = (run().float() - ref).abs().max().item()
                cells.append(f"{name}: {mean_ms(run):.3f} ms (max error {err:.3f})")
            except RuntimeError as e:
                cells.append(f"{name}: refused ({str(e)[:40]})")
        print(f"rows {rows}, tokens {tokens}, keys {keys}, heads {heads}/{kv_heads}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
