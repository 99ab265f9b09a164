"""SamplingParams (per-request settings) and sample_next: logits in, token ids out.

Entropy for routing is taken by the router on the raw logits before anything here runs; temperature, top-k
and top-p only shape the distribution a token is drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ead.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded and when it stops.

    temperature 0 is greedy (argmax). top_k 0 and top_p 1 switch those filters off. `seed` makes sampled runs
    reproducible. Generation stops at any end-of-sequence id of the pair (unless `ignore_eos`, for benchmarks),
    at the first `stop` string (not included in the text) or after `max_new_tokens`.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row. logits (B, V) -> ids (B,) int64, on the logits' device."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, params), num_samples=1, generator=generator).squeeze(-1)


def sampling_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a sampled token is drawn from: (..., V) logits -> (..., V) float32 probabilities.
    Speculative sampling shapes both models' distributions with this before comparing them.

    Filters act on temperature-scaled float32 logits: top-k keeps the k largest, top-p keeps the smallest set
    of most likely tokens whose probability reaches p (always at least the top token).
    """
    scaled = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if params.top_p < 1:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach p; the first token is never dropped.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, -math.inf)
    return scaled.softmax(dim=-1)
