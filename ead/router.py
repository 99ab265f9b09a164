"""The EAD rule: entropy in bits, a rolling mean over the last w tokens, and the switch with a minimum dwell.

`entropy_bits` is the only function here that touches torch; `RollingMean`, `choose_model` and `Router` work
on plain floats, so they are tested with lists of numbers. The router never touches caches, runners or the
device: the engine asks it which model writes the next token and does the rest.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ead.config import Role, RouterConfig
from ead.errors import ConfigError


def entropy_bits(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) over the last dim, in bits. (..., V) -> (...), float32.

    Raw logits at temperature 1, no top-k/top-p: the router sees the model, not the sampler. Computed from
    log_softmax in float32 so that bf16 logits and near-one-hot distributions stay exact (0 * -inf is masked).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    nats = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)
    return nats / math.log(2)


SIGNAL_NAMES = ("entropy_bits", "varentropy_bits2", "top1_prob", "margin")


@dataclass(frozen=True)
class TokenSignals:
    """What a router may read about the distribution a token was drawn from (raw logits, temperature 1).

    `entropy_bits` is the paper's signal; `varentropy_bits2` the variance of the surprisal -log2 p (bits
    squared); `top1_prob` the largest probability; `margin` the largest minus the second largest.
    """

    entropy_bits: float
    varentropy_bits2: float = math.nan
    top1_prob: float = math.nan
    margin: float = math.nan

    @classmethod
    def from_values(cls, values: list[float]) -> TokenSignals:
        """From one row of `token_signals(...).tolist()`, in SIGNAL_NAMES order."""
        return cls(*values)


def token_signals(logits: Tensor) -> Tensor:
    """Every signal of TokenSignals for each row: (B, V) -> (B, 4) float32, columns in SIGNAL_NAMES order.

    One pass over the logits on their device, so the engine moves them to the host in the same sync as the
    sampled tokens.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    log2p = torch.where(p > 0, logp, torch.zeros_like(logp)) / math.log(2)
    h = -(p * log2p).sum(dim=-1)  # (B,)
    varentropy = (p * (log2p + h[:, None]) ** 2).sum(dim=-1)
    # The two largest probabilities as reductions, not topk: compiled (Kernels.with_summary) they fuse with the
    # rest. On an H100 the summary of 64 rows took 234 us so, 371 us with topk, 622 us eager; masking the argmax
    # instead broke inductor's fusion at batch 1. A tie for the largest gives margin 0, as with topk.
    top1 = p.amax(dim=-1, keepdim=True)
    below = torch.where(p < top1, p, -1.0).amax(dim=-1)
    top1 = top1[:, 0]
    top2 = torch.where((p == top1[:, None]).sum(dim=-1) > 1, top1, below)
    return torch.stack([h, varentropy, top1, top1 - top2], dim=-1)


def token_summary(logits: Tensor) -> Tensor:
    """token_signals and the greedy token per row: (B, V) -> (B, 5) float32, the argmax last (ids below 2**24
    are exact in float32). Computed inside a decode graph, it leaves one small copy to the host per step."""
    return torch.cat([token_signals(logits), logits.argmax(dim=-1, keepdim=True).to(torch.float32)], dim=-1)


def logits_with_summary(logits: Tensor, vocab_size: int) -> Tensor:
    """The native runner's output layout: (n, >= vocab_size) logits of any float dtype -> (n, vocab_size + 5)
    float32, the first vocab_size logits, then token_summary's columns. Captured decode graphs run it compiled
    (`Kernels.with_summary`): a few fused reductions instead of some twenty kernels; on an H100 a batch-64 decode
    graph of the 1.5B shape replays in 2.75 ms so, 2.94 ms with the summary eager (BENCHMARKS.md)."""
    logits = logits[:, :vocab_size].float()
    return torch.cat([logits, token_summary(logits)], dim=-1)


class RoutingPolicy(Protocol):
    """What the engine needs of a router, one per sequence: the model that writes the next token (`active`),
    `observe` after every generated token with the signals of the distribution it was drawn from, returning
    the model for the next token, and `last_mean_bits`, the smoothed signal shown in traces.

    `Router` (the paper's rule) is one; a random-routing control or a budget controller are others.
    """

    active: Role
    last_mean_bits: float

    def observe(self, signals: TokenSignals) -> Role: ...


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

    Call `observe(signals)` once per generated token with the signals of the distribution that token was
    drawn from (a plain float is taken as its entropy in bits, for scripted streams); it returns the role that
    writes the next token.
    """

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.active = cfg.start
        self.window = RollingMean(cfg.window_tokens)
        self.tokens_since_switch = 0
        self.last_mean_bits = math.nan

    def observe(self, signals: TokenSignals | float) -> Role:
        bits = signals.entropy_bits if isinstance(signals, TokenSignals) else float(signals)
        self.last_mean_bits = self.window.push(bits)
        self.tokens_since_switch += 1
        role = choose_model(self.last_mean_bits, self.active, self.tokens_since_switch, self.cfg)
        if role is not self.active:
            self.active, self.tokens_since_switch = role, 0
        return role


class ScriptedRouter:
    """A RoutingPolicy that replays a fixed list of roles, one per generated token, then keeps the last one.
    For benchmarks and tests that need switches at known places whatever the models' entropy.

    `min_dwell_tokens`: the dwell the script keeps (a script of the paper's rule keeps its d_min), which the engine
    may then count on as it does on the rule's: for that many tokens after a switch (and from the start) the router
    keeps its model for certain (`ead.engine._keeps_model`); past the dwell it may switch at any token, as far as
    the engine can tell. 0: only past the script's end is anything certain. A script that switches within its
    dwell is refused."""

    def __init__(self, roles: list[Role], min_dwell_tokens: int = 0) -> None:
        self.roles, self.n, self.min_dwell_tokens = list(roles), 0, min_dwell_tokens
        self.active, self.last_mean_bits = self.roles[0], math.nan
        self.tokens_since_switch = 0
        starts = [0] + [i for i in range(1, len(self.roles)) if self.roles[i] is not self.roles[i - 1]]
        short = [i for i, j in itertools.pairwise(starts) if j - i < min_dwell_tokens]
        if short:
            length = starts[starts.index(short[0]) + 1] - short[0]
            raise ConfigError(f"the script switches {length} tokens after token {short[0]}, within its dwell of "
                              f"{min_dwell_tokens}; give a shorter dwell (0 = none)")

    @classmethod
    def of_rule(cls, roles: list[Role]) -> ScriptedRouter:
        """A script the paper's rule wrote at its default dwell (`RouterConfig().min_dwell_tokens`), declaring it, as
        `ead bench`'s scripted shares do (`ead.bench.roles_for_share`)."""
        return cls(roles, RouterConfig().min_dwell_tokens)

    def observe(self, signals: TokenSignals | float) -> Role:
        self.n += 1
        role = self.roles[min(self.n, len(self.roles) - 1)]
        self.tokens_since_switch = 0 if role is not self.active else self.tokens_since_switch + 1
        self.active = role
        return self.active
