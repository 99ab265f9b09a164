"""The EAD rule: entropy in bits, a rolling mean over the last w tokens, and the switch with a minimum dwell.

`entropy_bits` is the only function here that touches torch; `RollingMean`, `choose_model` and `Router` work
on plain floats, so they are tested with lists of numbers. The router never touches caches, runners or the
device: the engine asks it which model writes the next token and does the rest.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor

from ead.config import Role, RouterConfig


def entropy_bits(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) over the last dim, in bits. (..., V) -> (...), float32.

    Raw logits at temperature 1, no top-k/top-p: the router sees the model, not the sampler. Computed from
    log_softmax in float32 so that bf16 logits and near-one-hot distributions stay exact (0 * -inf is masked).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    nats = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)
    return nats / math.log(2)


class RollingMean:
    """Mean of the last `window_tokens` values pushed (fewer while the window fills)."""

    def __init__(self, window_tokens: int) -> None:
        self.values: deque[float] = deque(maxlen=window_tokens)

    def push(self, value: float) -> float:
        self.values.append(value)
        return sum(self.values) / len(self.values)


def choose_model(mean_bits: float, active: Role, tokens_since_switch: int, cfg: RouterConfig) -> Role:
    """LARGE above cfg.threshold_bits, else SMALL; keep `active` until it has written cfg.min_dwell_tokens."""
    if tokens_since_switch < cfg.min_dwell_tokens:
        return active
    return Role.LARGE if mean_bits > cfg.threshold_bits else Role.SMALL


class Router:
    """One sequence's routing state: the active model, the entropy window and the dwell counter.

    Call `observe(bits)` once per generated token with the entropy of the distribution that token was drawn
    from; it returns the role that writes the next token.
    """

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.active = cfg.start
        self.window = RollingMean(cfg.window_tokens)
        self.tokens_since_switch = 0
        self.last_mean_bits = math.nan

    def observe(self, bits: float) -> Role:
        self.last_mean_bits = self.window.push(bits)
        self.tokens_since_switch += 1
        role = choose_model(self.last_mean_bits, self.active, self.tokens_since_switch, self.cfg)
        if role is not self.active:
            self.active, self.tokens_since_switch = role, 0
        return role
