"""Routers beyond the paper's: the EAD rule on any of the four routing signals, with optional hysteresis, and a
budget mode whose threshold is steered online so that the large model writes a target share of the tokens.

Every router here implements `ead.router.RoutingPolicy` (`active`, `last_mean_bits`, `observe(signals)`), one per
sequence, and works on plain floats: the engine computes the signals (`ead.router.token_signals`) and moves them
to the host; this module only reads them. `make_router(RoutingConfig(...))` builds the right one, to pass as
`Engine.generate(ids, sampling, router=...)`.

One convention for every signal: the router reads a *difficulty*, where larger means harder text, and the large
model takes over while the rolling mean of difficulty is above the threshold.

    signal       difficulty of one token          units     range
    entropy      entropy of the distribution      bits      [0, log2 V]   (the paper's signal)
    varentropy   variance of the surprisal        bits^2    [0, ...)
    top1         1 - top-1 probability            -         [0, 1]
    margin       1 - (top-1 minus top-2 prob.)    -         [0, 1]

So `--signal top1 --tau 0.3` sends text to the large model while the mean top-1 probability is below 0.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ead.config import DEFAULT_MIN_DWELL_TOKENS, DEFAULT_THRESHOLD_BITS, DEFAULT_WINDOW_TOKENS, Role, RouterConfig
from ead.errors import ConfigError
from ead.router import RollingMean, RoutingPolicy, TokenSignals

# signal name -> (TokenSignals field, difficulty = 1 - value?, units, largest possible difficulty or None)
SIGNALS: dict[str, tuple[str, bool, str, float | None]] = {
    "entropy": ("entropy_bits", False, "bits", None),
    "varentropy": ("varentropy_bits2", False, "bits^2", None),
    "top1": ("top1_prob", True, "(1 - top-1 probability)", 1.0),
    "margin": ("margin", True, "(1 - top-1/top-2 margin)", 1.0),
}

# Where budget mode may move the threshold, per signal. The controller works on log(threshold), so the lower
# bound must be > 0; these are wide enough that only an unreachable target pins the threshold to one of them.
DEFAULT_BOUNDS = {"entropy": (1e-3, 20.0), "varentropy": (1e-3, 400.0), "top1": (1e-4, 1.0), "margin": (1e-4, 1.0)}
# Per-token step of log(threshold) per unit of share error (BudgetRouter), Mirostat's learning rate. On scripted
# streams 0.1 held 300-token blocks within 0.015 (i.i.d.) to 0.05 (bursty) of a 0.25 target on average; 0.05 cut
# the threshold's jitter by 40% but tracked worse (0.07 on the bursty stream), 0.2 tracked a little better and
# jittered 40% more.
DEFAULT_GAIN = 0.1


def difficulty(signals: TokenSignals | float, signal: str) -> float:
    """One token's difficulty under `signal` (larger = harder; see the table above). A plain float is taken as the
    signal's own value (entropy bits, varentropy, top-1 probability or margin), for scripted streams."""
    name, flip, _, _ = SIGNALS[signal]
    value = getattr(signals, name) if isinstance(signals, TokenSignals) else float(signals)
    return 1.0 - value if flip else value


@dataclass(frozen=True)
class BudgetConfig:
    """Budget mode: steer the threshold so that the large model writes `large_share` of each sequence's tokens.

    `threshold_bounds` (lo, hi) with 0 < lo < hi limit the threshold (None: DEFAULT_BOUNDS for the signal);
    `gain` is the controller's step (see BudgetRouter). Build it from a cost target with `for_cost_ratio`.
    """

    large_share: float
    threshold_bounds: tuple[float, float] | None = None
    gain: float = DEFAULT_GAIN

    def __post_init__(self) -> None:
        f = self.large_share
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ConfigError(f"the target large share must be a fraction in [0, 1], got {f!r}; "
                              "e.g. --large-share 0.25 for the paper's operating point")
        if self.threshold_bounds is not None:
            lo, hi = self.threshold_bounds
            if not (0 < lo < hi < math.inf):
                raise ConfigError(f"threshold bounds must satisfy 0 < lo < hi < inf, got ({lo!r}, {hi!r}); "
                                  "the controller works on log(threshold), so lo must be positive")
        if not isinstance(self.gain, (int, float)) or not 0 < self.gain <= 1:
            raise ConfigError(f"the controller gain must be in (0, 1], got {self.gain!r}; the default is "
                              f"{DEFAULT_GAIN}")

    @classmethod
    def for_cost_ratio(cls, cost_ratio: float, params_small: int, params_large: int, **kw) -> BudgetConfig:
        """The budget whose large share gives the paper's cost ratio: see `large_share_for_cost_ratio`."""
        return cls(large_share=large_share_for_cost_ratio(cost_ratio, params_small, params_large), **kw)


def large_share_for_cost_ratio(cost_ratio: float, params_small: int, params_large: int) -> float:
    """Invert the paper's cost c = ((1-f) P_small + f P_large) / P_large: f = (c - r) / (1 - r), r = P_small/P_large.

    c runs from r (small model alone) to 1 (large model alone); anything outside is unreachable.
    """
    if not 0 < params_small < params_large:
        raise ConfigError(f"a cost target needs 0 < small params < large params, got {params_small} and "
                          f"{params_large}; pass --large-share instead")
    r = params_small / params_large
    if isinstance(cost_ratio, bool) or not isinstance(cost_ratio, (int, float)) or not r <= cost_ratio <= 1:
        raise ConfigError(f"a cost ratio for this pair must be in [{r:.3f}, 1] (small model alone .. large model "
                          f"alone), got {cost_ratio!r}")
    return (cost_ratio - r) / (1 - r)


@dataclass(frozen=True)
class RoutingConfig:
    """The EAD rule on a chosen signal. `threshold` is the paper's tau in the signal's difficulty units (module
    docstring); `threshold_down` adds hysteresis: once large, the large model keeps writing until the mean is
    <= threshold_down (None = threshold, the paper's rule). `window_tokens` is w, `min_dwell_tokens` d_min.
    With `budget`, `threshold` is only where the controller starts (a calibrated tau is the best start).
    """

    signal: str = "entropy"
    threshold: float = DEFAULT_THRESHOLD_BITS
    threshold_down: float | None = None
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    min_dwell_tokens: int = DEFAULT_MIN_DWELL_TOKENS
    start: Role = Role.SMALL
    budget: BudgetConfig | None = None

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ConfigError(f"unknown routing signal {self.signal!r}; choose one of {', '.join(SIGNALS)}")
        self._check_threshold("tau", self.threshold)
        if self.threshold_down is not None:
            self._check_threshold("tau-down", self.threshold_down)
            if self.threshold_down > self.threshold:
                raise ConfigError(f"tau-down ({self.threshold_down}) must be <= tau ({self.threshold}): the large "
                                  "model hands back below the level at which it took over")
        # RouterConfig checks window, d_min and start with the CLI's messages; it also builds the paper's rule.
        rule = RouterConfig(threshold_bits=math.inf, window_tokens=self.window_tokens,
                            min_dwell_tokens=self.min_dwell_tokens, start=self.start)
        object.__setattr__(self, "start", rule.start)
        if self.budget is not None:
            lo, hi = self.bounds
            if not lo <= self.threshold <= hi or (self.threshold_down is not None and self.threshold_down <= 0):
                raise ConfigError(f"in budget mode the starting tau must lie in the controller's bounds "
                                  f"[{lo:g}, {hi:g}] (and tau-down > 0), got tau {self.threshold}, tau-down "
                                  f"{self.threshold_down}; drop --tau to start from the default")

    def _check_threshold(self, name: str, value: object) -> None:
        _, _, units, top = SIGNALS[self.signal]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{name} must be a number in {units}, got {value!r}; try --{name} 0.5")
        if math.isfinite(value) and (value < 0 or (top is not None and value > top)):
            where = f"in [0, {top:g}]" if top is not None else ">= 0"
            raise ConfigError(f"{name} for signal {self.signal!r} must be {where} {units} (difficulty: larger = "
                              f"harder), got {value}; use {name}=-inf to always route to the large model")

    @property
    def bounds(self) -> tuple[float, float]:
        """Budget mode's threshold range (lo, hi)."""
        assert self.budget is not None
        return self.budget.threshold_bounds or DEFAULT_BOUNDS[self.signal]

    @classmethod
    def from_router_config(cls, cfg: RouterConfig, **changes) -> RoutingConfig:
        """The paper's rule as configured by `cfg` (tau, w, d_min, start), with any field replaced by `changes`."""
        base = dict(threshold=cfg.threshold_bits, window_tokens=cfg.window_tokens,
                    min_dwell_tokens=cfg.min_dwell_tokens, start=cfg.start)
        return cls(**(base | changes))


def switch_rule(mean: float, active: Role, tokens_since_switch: int, up: float, down: float,
                min_dwell_tokens: int) -> Role:
    """The EAD rule with hysteresis: keep `active` for min_dwell_tokens; then the small model hands over when the
    mean difficulty is > up, and the large model hands back when it is <= down. up == down is the paper's rule."""
    if tokens_since_switch < min_dwell_tokens:
        return active
    if active is Role.SMALL:
        return Role.LARGE if mean > up else Role.SMALL
    return Role.SMALL if mean <= down else Role.LARGE


class SignalRouter:
    """One sequence's routing on `cfg.signal`: the rolling mean of difficulty, the dwell counter, the active model.

    On entropy without hysteresis it makes exactly the decisions of `ead.router.Router`. `last_mean_bits` holds the
    rolling mean of difficulty (bits only for entropy), `large_share` the share of observed tokens the large
    model wrote so far.
    """

    def __init__(self, cfg: RoutingConfig) -> None:
        self.cfg = cfg
        self.threshold_up = cfg.threshold
        self.threshold_down = cfg.threshold if cfg.threshold_down is None else cfg.threshold_down
        self.active = cfg.start
        self.window = RollingMean(cfg.window_tokens)
        self.tokens_since_switch = 0
        self.last_mean_bits = math.nan
        self.tokens = 0
        self.large_tokens = 0

    @property
    def large_share(self) -> float:
        """Share of the tokens observed so far that the large model wrote (0 before the first)."""
        return self.large_tokens / self.tokens if self.tokens else 0.0

    def observe(self, signals: TokenSignals | float) -> Role:
        """Take the signals of the token just written by `self.active`; return the model for the next token."""
        self.tokens += 1
        self.large_tokens += self.active is Role.LARGE
        self.last_mean_bits = self.window.push(difficulty(signals, self.cfg.signal))
        self.tokens_since_switch += 1
        role = switch_rule(self.last_mean_bits, self.active, self.tokens_since_switch, self.threshold_up,
                           self.threshold_down, self.cfg.min_dwell_tokens)
        if role is not self.active:
            self.active, self.tokens_since_switch = role, 0
        return role


class BudgetRouter(SignalRouter):
    """The EAD rule with a threshold steered online so that the large model writes `budget.large_share` of the
    tokens of this sequence, in the spirit of Mirostat, which steers its truncation to a target surprise.

    Design: integral control of log(threshold) on the share error, once per token. After each token,

        log tau <- clip(log tau + gain * (1[the large model wrote it] - target), log lo, log hi)

    so tau rises while the large model writes more than its share and falls while it writes less. Why this form:

    - Integral action has no steady-state error: summed over n unclipped tokens the updates telescope to
      n * (realised share - target) = log(tau_n / tau_0) / gain, so the share error is bounded by
      |log(tau_n / tau_0)| / (gain * n) and shrinks as 1/n while tau stays inside its bounds.
    - Log space makes the step scale-free: the useful entropy thresholds span decades (0.05 to 2 bits on real
      pairs), and a relative step suits all of them and every signal, with no per-signal gain.
    - Rate limit: one step changes tau by at most a factor exp(gain * max(target, 1 - target)), 8% at the
      default gain and a 0.25 target, so tau moves the level at which the signal hands over and never flips the
      decision itself: switches still come from the signal. On a constant signal the share can only be met by
      alternating segments; over one d_min-token large segment tau rises by exp(gain * d_min * (1 - target))
      (2.1x at the defaults), which is why the bounds should sit well away from the levels the signal takes. On
      a bursty scripted stream it switched 1.07x as often as the best static tau (tests/test_routing.py).
    - Anti-windup: tau itself is the integrator and is clipped to [lo, hi], so an unreachable target pins tau
      at a bound and it leaves the bound as soon as the error changes sign.
    - The paper's d_min dwell and start-on-small stay in force: the controller never forces a switch.

    With `threshold_down`, the hysteresis gap is kept as a ratio: down = tau * threshold_down / threshold.
    """

    def __init__(self, cfg: RoutingConfig) -> None:
        assert cfg.budget is not None, "BudgetRouter needs RoutingConfig(budget=BudgetConfig(...))"
        super().__init__(cfg)
        self.target = cfg.budget.large_share
        self.gain = cfg.budget.gain
        lo, hi = cfg.bounds
        self.log_bounds = (math.log(lo), math.log(hi))
        self.log_threshold = math.log(cfg.threshold)  # RoutingConfig checked lo <= threshold <= hi, lo > 0
        self.down_ratio = 1.0 if cfg.threshold_down is None else cfg.threshold_down / cfg.threshold
        self._set_thresholds()

    @property
    def threshold(self) -> float:
        """The current threshold (the up threshold with hysteresis), in the signal's difficulty units."""
        return self.threshold_up

    def observe(self, signals: TokenSignals | float) -> Role:
        wrote = 1.0 if self.active is Role.LARGE else 0.0
        lo, hi = self.log_bounds
        self.log_threshold = min(hi, max(lo, self.log_threshold + self.gain * (wrote - self.target)))
        self._set_thresholds()
        return super().observe(signals)

    def _set_thresholds(self) -> None:
        self.threshold_up = math.exp(self.log_threshold)
        self.threshold_down = self.threshold_up * self.down_ratio


def make_router(cfg: RoutingConfig) -> RoutingPolicy:
    """A fresh router for one sequence: BudgetRouter when `cfg.budget` is set, else SignalRouter."""
    return BudgetRouter(cfg) if cfg.budget is not None else SignalRouter(cfg)
