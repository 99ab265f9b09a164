"""The random-routing control: the large model writes randomly placed segments, as many tokens in expectation
as an EAD run gave it, so a comparison shows what entropy routing adds over spending the same budget blindly.

`RandomRouter` implements `ead.router.RoutingPolicy`. It reads no signal to decide (only to show a rolling mean
in traces): generated tokens come in blocks of d_min, and each block goes to the large model with probability
`large_share`, so every token is the large model's with that probability and the expected share is exactly it.
"""

from __future__ import annotations

import hashlib
import math
import random

from ead.config import DEFAULT_MIN_DWELL_TOKENS, DEFAULT_WINDOW_TOKENS, Role
from ead.errors import ConfigError
from ead.router import RollingMean, TokenSignals


def problem_seed(seed: int, problem_id: str) -> int:
    """A 63-bit seed from the run's seed and a problem id: the same on every machine and in every order, so a
    resumed run routes each problem exactly as an uninterrupted one would."""
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RandomRouter:
    """Blocks of `block_tokens` generated tokens; each block is the large model's with probability
    `large_share`, drawn from `random.Random(seed)`. Blocks of d_min tokens match the dwell of the EAD rule,
    so the control switches about as rarely as EAD and pays comparable catch-up."""

    def __init__(self, large_share: float, seed: int, block_tokens: int = DEFAULT_MIN_DWELL_TOKENS,
                 window_tokens: int = DEFAULT_WINDOW_TOKENS) -> None:
        if isinstance(large_share, bool) or not isinstance(large_share, (int, float)) or not 0 <= large_share <= 1:
            raise ConfigError(f"the random control's large share must be in [0, 1], got {large_share!r}")
        self.large_share = float(large_share)
        self.block_tokens = max(1, block_tokens)  # d_min 0 means a fresh draw for every token
        self.rng = random.Random(seed)
        self.window = RollingMean(window_tokens)
        self.tokens_in_block = 0
        self.last_mean_bits = math.nan
        self.active = self._draw()

    def _draw(self) -> Role:
        return Role.LARGE if self.rng.random() < self.large_share else Role.SMALL

    def observe(self, signals: TokenSignals | float) -> Role:
        bits = signals.entropy_bits if isinstance(signals, TokenSignals) else float(signals)
        self.last_mean_bits = self.window.push(bits)
        self.tokens_in_block += 1
        if self.tokens_in_block == self.block_tokens:
            self.active, self.tokens_in_block = self._draw(), 0
        return self.active
