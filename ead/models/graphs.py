"""CUDA graph capture and replay of the batch-1, one-token decode step.

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
    """One captured decode step of `model` on row 0 of `cache`: (token id, position) -> (V,) float32 logits.

    Replay runs exactly the kernels of an eager `model(tokens, positions, cache, last_only=True)` for one
    token, writing its key and value at `position` and advancing `cache.lengths[0]` by one, so graph and
    eager decode give the same tokens. Decode attends over all max_seq_tokens + 1 cache slots, masked, since
    the graph's shapes are static: it reads the whole cache every step (for Qwen2.5-14B at 4096 slots, about
    0.8 GB of keys and values per token beside 29.5 GB of weights), which a length-aware kernel would skip.
    """

    @torch.inference_mode()
    def __init__(self, model: Transformer, cache: KVCache, pool: tuple[int, int] | None = None) -> None:
        device = cache.k.device
        assert device.type == "cuda", f"CUDA graphs need a CUDA cache, got {device}"
        self.tokens = torch.zeros((1, 1), dtype=torch.int64, device=device)  # (B, T) = (1, 1)
        # Warm-up runs write their key and value to the trash slot (position = trash slot), and the length
        # they add is put back afterwards, so a graph can be captured mid-sequence without touching it.
        self.positions = torch.full((1, 1), cache.trash_slot, dtype=torch.int64, device=device)
        lengths = cache.lengths.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                model(self.tokens, self.positions, cache, last_only=True)
        torch.cuda.current_stream(device).wait_stream(side)

        # Capture records kernels without running them: the cache is untouched until the first replay.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model(self.tokens, self.positions, cache, last_only=True)[0].float()  # (V,)
        cache.lengths.copy_(lengths)

    @torch.inference_mode()  # the static buffers were made in inference mode and may only change in it
    def run(self, token_id: int, position: int) -> Tensor:
        """Decode `token_id` at `position` (= cache.lengths[0]) and return (V,) float32 logits. The tensor is
        the graph's static output: the next `run` overwrites it."""
        self.tokens.fill_(token_id)  # fill_ from a host int is a kernel argument: no copy, no sync
        self.positions.fill_(position)
        self.graph.replay()
        return self.logits
