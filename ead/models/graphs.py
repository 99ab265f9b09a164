"""CUDA graph capture and replay of the one-token decode step, for a batch of B cache rows.

Decoding one token of a 1.5B model is about a thousand small kernels. Launched one by one from Python, the GPU
spends most of each step waiting for the CPU (transformers' eager decode runs about 12 tok/s on an H100 at
every model size). A CUDA graph records the kernels of one step once and replays them with one launch.

This module owns the graph and its static buffers: the token id and position it reads, the logits it writes.
The math stays in transformer.py, the memory in kv_cache.py, and the choice of when to replay in the runner.
Prefill and catch-up feed a varying number of tokens and run eagerly; only the fixed-shape step is captured.
(The runner keeps graphs for padded catch-up buckets too, and for speculation's verification pass, which returns
every position's logits: see `out`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ead.models.kv_cache import KVCache
from ead.models.transformer import Transformer

WARMUP_STEPS = 3  # lazy initialisation (cuBLAS handles, workspaces) must happen before capture, not during


class DecodeGraph:
    """One captured forward of `model` over `batch` rows of `width` tokens each, attending over the first
    `kv_len` slots (None = all): (token ids, positions, valid lengths[, cache rows]) -> (batch, V) float32
    logits at each row's last valid token; with `vocab_size`, cut to that width and followed by the 5 columns
    of `ead.router.token_summary` (routing signals and greedy token), computed inside the graph (compiled, with
    fused kernels: `Kernels.with_summary`).

    width 1, rows 0..batch-1 (`compact` False): the decode step. width > 1 with `compact`: a catch-up of a few
    rows from anywhere in the cache (batch row b is cache row rows[b]), padded to the width bucket. With `out`
    (batch, width, V) float32: speculative verification, every position's logits written there, cut to V, with
    no summary; one buffer may serve graphs of several buckets (their outputs are never needed together).
    Replay runs exactly the kernels of the eager `model(...)` call with the same arguments, writing each valid
    token's key and value and advancing `cache.lengths`; rows with valid 0 are untouched (their pads go to
    the trash slot). Shapes are static, so attention reads all `kv_len` slots of every row, masked: the runner
    keeps one graph per bucket so that short sequences read short spans.
    """

    @torch.inference_mode()
    def __init__(self, model: Transformer, cache: KVCache, batch: int = 1, kv_len: int | None = None,
                 pool: tuple[int, int] | None = None, width: int = 1, compact: bool = False,
                 vocab_size: int | None = None, out: Tensor | None = None) -> None:
        device = cache.k.device
        assert device.type == "cuda", f"CUDA graphs need a CUDA cache, got {device}"
        self.batch, self.width, self.kv_len, self.compact = batch, width, kv_len, compact
        self.tokens = torch.zeros((batch, width), dtype=torch.int64, device=device)
        # Warm-up runs are padding (valid 0): keys and values go to the trash slot and no length moves, so a
        # graph can be captured mid-sequence without touching the cache's real contents.
        self.positions = torch.zeros((batch, width), dtype=torch.int64, device=device)
        self.valid = torch.zeros((batch,), dtype=torch.int64, device=device)
        self.rows = torch.zeros((batch,), dtype=torch.int64, device=device) if compact else None

        def forward(capture: bool = False) -> Tensor:
            logits = model(self.tokens, self.positions, cache, self.valid, last_only=out is None, kv_len=kv_len,
                           rows=self.rows)
            if out is not None:  # (B, W, V): every position, cast into the caller's buffer, by the capture only
                return out.copy_(logits[..., : out.shape[-1]]) if capture else logits
            if vocab_size is None:
                return logits.float()
            return model.kernels.with_summary(logits, vocab_size)  # (B, vocab + 5): token_summary's columns last

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # everything the capture records, compilations included, runs here first
            for _ in range(WARMUP_STEPS):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)

        # Capture records kernels without running them: the cache is untouched until the first replay. On the
        # cache's device and its side stream, not the current device's: the models of a pair may sit on two GPUs.
        # A tensor-parallel model's all-reduces are captured too (NCCL supports capture; the warm-up above ran
        # them once, so the communicator exists before capture).
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.graph, pool=pool, stream=side):
            self.logits = forward(capture=True)

    @torch.inference_mode()  # the static buffers were made in inference mode and may only change in it
    def run_rows(self, tokens: Tensor, positions: Tensor, valid: Tensor, rows: Tensor | None = None) -> Tensor:
        """tokens, positions (batch, width) int64; valid (batch,) (0 leaves a row idle); rows (batch,) for a
        compact graph. Returns the static (batch, V) float32 logits ((batch, width, V) with `out`), overwritten
        by the next replay."""
        self.tokens.copy_(tokens.view(self.batch, self.width), non_blocking=True)
        self.positions.copy_(positions.view(self.batch, self.width), non_blocking=True)
        self.valid.copy_(valid, non_blocking=True)
        if self.rows is not None:
            self.rows.copy_(rows, non_blocking=True)
        self.graph.replay()
        return self.logits
