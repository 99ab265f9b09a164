"""ModelRunner: one model and its own KV cache for one sequence, behind the three operations the engine uses.

`feed(ids)` appends tokens to the cache in one forward pass and returns the next-token logits; `seen` says how
many tokens the cache holds. Prefill, one-token decode and the catch-up after a switch are the same call with
different lengths. This runner drives a transformers model eagerly, batch size 1; a faster runner with the
same interface can replace it without touching the EAD rule in `ead.engine`.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel


class ModelRunner:
    def __init__(self, model: PreTrainedModel, vocab_size: int) -> None:
        self.model = model
        self.device = model.device
        # Both models' logits are read on the same width (some exports pad one head with unused rows).
        self.vocab_size = vocab_size
        self.max_seq_tokens = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.cache: DynamicCache | None = None
        self.seen = 0
        # transformers renamed `past_key_values` to `cache` in 5.2x; pass whichever this version's forward takes.
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def reset(self) -> None:
        """Forget the current sequence (a new request starts)."""
        self.cache, self.seen = None, 0

    @torch.inference_mode()
    def feed(self, token_ids: list[int]) -> Tensor:
        """Process `token_ids` (the tokens this model has not seen yet) and return the logits for the token
        after them: (V,) float32 on the model's device. Only the last position goes through the LM head."""
        assert token_ids, "feed needs at least one new token"
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # (1, T)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.cache})
        self.seen += len(token_ids)
        return out.logits[0, -1, : self.vocab_size].float()
