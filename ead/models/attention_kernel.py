"""Decode attention as a Triton kernel: one query per row, each row reading only its own keys (flash decoding).

SDPA with an additive mask reads all L slots of every row and a (B, 1, 1, L) mask, in every layer: 8 us a layer
for Qwen2.5-1.5B at batch 1 on an H200, an eighth of a decode step. Here each row's number of keys comes from the
device (the slot its new key was just written to), so blocks past it are skipped, there is no mask to read, and
the kernel is captured in a CUDA graph like any other: the grid depends only on (B, heads, L), all static.

Layout: one program per (batch row, kv head, split of the span). It loads the G = H / Hkv query heads that share
the kv head, so each key and value is read once per group. Long spans are cut into splits that run in parallel,
each leaving a partial softmax (its output and log-sum-exp), and a second small kernel combines them; a span that
fits one split is done in one pass. This module owns the kernels and their launch; transformer.py decides when
to use them (`Kernels.decode_attention`). Imported only where triton is (CUDA machines): CPU tests run the same
kernels under Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 64  # keys per loop step: a 16 KB tile of bf16 keys at head_dim 128
MIN_SPLIT_KEYS = 256  # a split reads at least this many keys; a span of up to 256 slots runs in one pass
TARGET_PROGRAMS = 256  # about two programs per SM of an H100 (132): enough to hide memory latency
MAX_SPLITS = 64  # the combine kernel holds (splits, head_dim) float32 partial outputs at once


@triton.jit
def _attend_split(q, k, v, rows, slots, out, part, lse, scale_log2, trash, n_slots,
                  sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, s_rows, s_slots, so_b, so_h,
                  sp_b, sp_h, sp_s, sl_b, sl_h,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLIT_KEYS: tl.constexpr, ONE_SPLIT: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Softmax attention of G query heads over keys [s * SPLIT_KEYS, ...) of one row and kv head, stopping at
    the row's last key. ONE_SPLIT: the normalised output into `out`; else the output into `part` and the
    log-sum-exp (base 2) into `lse`, -inf for a split past the row's keys."""
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(rows + b * s_rows)
    slot = tl.load(slots + b * s_slots)
    # A real query at position p wrote its key at slot p and attends slots 0..p; a padding row wrote to the
    # trash slot and attends slot 0 alone (finite whatever it holds), as `attention_mask` says.
    n = tl.minimum(tl.where(slot == trash, 1, slot + 1), n_slots).to(tl.int32)
    start = s * SPLIT_KEYS
    stop = tl.minimum(start + SPLIT_KEYS, n)

    g, d = tl.arange(0, G_PAD), tl.arange(0, D_PAD)
    heads, g_ok, d_ok = h * G + g, g < G, d < D
    # G padded to 16 rows (tl.dot's smallest tile) and D to a power of two; pads load zeros and are never stored.
    qg = tl.load(q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_row = k + row * sk_b + h * sk_h
    v_row = v + row * sv_b + h * sv_h
    m_i = tl.full([G_PAD], -float("inf"), tl.float32)  # running max of the scores, base 2
    l_i = tl.zeros([G_PAD], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        keep = offs < stop
        kb = tl.load(k_row + offs[:, None] * sk_n + d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
        x = tl.dot(qg, tl.trans(kb), input_precision=PRECISION) * scale_log2  # (G_PAD, BLOCK_N)
        x = tl.where(keep[None, :], x, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))  # finite: every block holds at least one key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_row + offs[:, None] * sv_n + d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new
    store = g_ok[:, None] & d_ok[None, :]
    if ONE_SPLIT:
        y = acc / l_i[:, None]
        tl.store(out + b * so_b + heads[:, None] * so_h + d[None, :], y.to(out.dtype.element_ty), mask=store)
    else:
        has = l_i > 0  # false for a split that starts past the row's keys
        y = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(part + b * sp_b + heads[:, None] * sp_h + s * sp_s + d[None, :], y, mask=store)
        lse_i = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), -float("inf"))
        tl.store(lse + b * sl_b + heads * sl_h + s, lse_i, mask=g_ok)


@triton.jit
def _combine_splits(part, lse, out, sp_b, sp_h, sp_s, sl_b, sl_h, so_b, so_h,
                    SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """One (row, head): the splits' outputs weighted by exp2(lse - max lse), normalised."""
    b, h = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, S_PAD), tl.arange(0, D_PAD)
    w = tl.load(lse + b * sl_b + h * sl_h + s, mask=s < SPLITS, other=-float("inf"))
    w = tl.exp2(w - tl.max(w, 0))  # split 0 always holds a key, so the max is finite
    y = tl.load(part + b * sp_b + h * sp_h + s[:, None] * sp_s + d[None, :],
                mask=(s < SPLITS)[:, None] & (d < D)[None, :], other=0.0)
    y = tl.sum(y * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out + b * so_b + h * so_h + d, y.to(out.dtype.element_ty), mask=d < D)


def split_keys(n_slots: int, programs: int) -> int:
    """Keys per split for a span of `n_slots` and `programs` (rows x kv heads) programs per split: enough splits
    to fill the GPU, none shorter than MIN_SPLIT_KEYS, at most MAX_SPLITS; a multiple of BLOCK_N."""
    splits = max(1, min(math.ceil(n_slots / MIN_SPLIT_KEYS), math.ceil(TARGET_PROGRAMS / programs), MAX_SPLITS))
    return BLOCK_N * math.ceil(n_slots / (splits * BLOCK_N))


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, slots: Tensor, n_slots: int,
                     keys_per_split: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for one query per row, over each row's own keys. (B, 1, H, D) -> (B, 1, H, D).

    q: rotated queries, any dtype the cache has; k_cache, v_cache: one layer's (max_batch, Hkv, S+1, D), slot S
    the trash slot; rows, slots: (B,) int, batch row b reads cache row rows[b] and attends slots 0..slots[b] (its
    new key sits at slots[b], its position), or slot 0 alone when slots[b] == S (a padding row: finite garbage).
    `n_slots` (L, a Python int) bounds the keys read and, with B and the heads, fixes the grid, so one CUDA graph
    serves any lengths within it. `keys_per_split` overrides `split_keys` (tests). Float32 math, output in q's
    dtype. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
    """
    B, T, H, D = q.shape
    Hkv = k_cache.shape[1]
    assert T == 1 and H % Hkv == 0 and q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    G, chunk = H // Hkv, keys_per_split or split_keys(n_slots, B * Hkv)
    splits = math.ceil(n_slots / chunk)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # Per-call scratch with static shapes: inside a graph capture it comes from the graph's private pool.
    part = out.new_empty((B, H, splits, D), dtype=torch.float32) if splits > 1 else out
    lse = out.new_empty((B, H, splits), dtype=torch.float32) if splits > 1 else out
    G_PAD, D_PAD = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D))
    # Triton launches on the current device, not the tensors': a pair's models may sit on two GPUs.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attend_split[(B, Hkv, splits)](
            q, k_cache, v_cache, rows, slots, out, part, lse, math.log2(math.e) / math.sqrt(D), k_cache.shape[2] - 1,
            n_slots, q.stride(0), q.stride(2), *k_cache.stride()[:3], *v_cache.stride()[:3], rows.stride(0),
            slots.stride(0), out.stride(0), out.stride(2), *part.stride()[:3], *lse.stride()[:2],
            G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, BLOCK_N=BLOCK_N, SPLIT_KEYS=chunk, ONE_SPLIT=splits == 1,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
        if splits > 1:
            _combine_splits[(B, H)](part, lse, out, *part.stride()[:3], *lse.stride()[:2], out.stride(0),
                                    out.stride(2), SPLITS=splits, S_PAD=triton.next_power_of_2(splits), D=D,
                                    D_PAD=D_PAD, num_warps=4)
    return out
