"""CUDA graph capture and replay of the one-token decode step, for a batch of B cache rows.

Decoding one token of a 1.5B model is about a thousand small kernels. Launched one by one from Python, the GPU
spends most of each step waiting for the CPU (transformers' eager decode runs about 12 tok/s on an H100 at
every model size). A CUDA graph records the kernels of one step once and replays them with one launch.

This module owns the graph and its static buffers: the token id and position it reads, the logits it writes.
The math stays in transformer.py, the memory in kv_cache.py, and the choice of when to replay in the runner.
Prefill and catch-up feed a varying number of tokens and run eagerly; only the fixed-shape step is captured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ead.models.kv_cache import KVCache
from ead.models.transformer import Transformer

WARMUP_STEPS = 3  # lazy initialisation (cuBLAS handles, workspaces) must happen before capture, not during


class DecodeGraph:
    """One captured decode step of `model` on rows 0..batch-1 of `cache`, attending over the first `kv_len`
    slots (None = all): (token id, position, valid) per row -> (batch, V) float32 logits.

    Replay runs exactly the kernels of an eager `model(tokens, positions, cache, valid, last_only=True,
    kv_len=kv_len)` for one token per row, writing each valid row's key and value at its position and
    advancing its `cache.lengths` by one; rows with valid 0 are untouched. Graph and eager decode give the same
    tokens. Shapes are static, so attention reads all `kv_len` slots of every row, masked: the runner keeps
    one graph per (batch bucket, kv_len bucket) so that short sequences read short spans.
    """

    @torch.inference_mode()
    def __init__(self, model: Transformer, cache: KVCache, batch: int = 1, kv_len: int | None = None,
                 pool: tuple[int, int] | None = None) -> None:
        device = cache.k.device
        assert device.type == "cuda", f"CUDA graphs need a CUDA cache, got {device}"
        self.batch, self.kv_len = batch, kv_len
        self.tokens = torch.zeros((batch, 1), dtype=torch.int64, device=device)  # (B, T=1)
        # Warm-up runs are padding (valid 0): keys and values go to the trash slot and no length moves, so a
        # graph can be captured mid-sequence without touching the cache's real contents.
        self.positions = torch.zeros((batch, 1), dtype=torch.int64, device=device)
        self.valid = torch.zeros((batch,), dtype=torch.int64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                model(self.tokens, self.positions, cache, self.valid, last_only=True, kv_len=kv_len)
        torch.cuda.current_stream(device).wait_stream(side)

        # Capture records kernels without running them: the cache is untouched until the first replay.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model(self.tokens, self.positions, cache, self.valid, last_only=True,
                                kv_len=kv_len).float()  # (B, V)
        self.valid.fill_(1)

    @torch.inference_mode()  # the static buffers were made in inference mode and may only change in it
    def run(self, token_id: int, position: int) -> Tensor:
        """Batch 1: decode `token_id` at `position` (= cache.lengths[0]) and return (V,) float32 logits. The
        tensor is the graph's static output: the next replay overwrites it."""
        self.tokens.fill_(token_id)  # fill_ from a host int is a kernel argument: no copy, no sync
        self.positions.fill_(position)
        self.graph.replay()
        return self.logits[0]

    @torch.inference_mode()
    def run_rows(self, tokens: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """Decode one token per row: tokens, positions, valid (B,) int64 (valid 0 leaves a row idle).
        Returns the static (B, V) float32 logits, overwritten by the next replay."""
        self.tokens.copy_(tokens[:, None], non_blocking=True)
        self.positions.copy_(positions[:, None], non_blocking=True)
        self.valid.copy_(valid, non_blocking=True)
        self.graph.replay()
        return self.logits
