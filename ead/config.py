"""EADConfig and its parts: one frozen, validated object built once at the edge (CLI, server, eval) and passed
down, each component taking only its part, e.g. `Router(cfg.router)`.

Per-request settings (temperature, top-p, stop strings, ...) live in `ead.sampling.SamplingParams`, apart from
these engine-wide ones.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ead.errors import ConfigError


class Role(str, enum.Enum):
    """Which model of the pair produced a token or is active."""

    SMALL = "small"
    LARGE = "large"


# Chosen from measurements on the default pair (Qwen2.5-Coder 0.5B/1.5B): at 0.5 bits the large model writes 26% of
# the tokens on GSM8K test and 15.5% on MATH-500, where EAD beats random routing at equal share (EVALUATION.md;
# docs/choosing-tau.md has the first, CPU-sized look).
DEFAULT_THRESHOLD_BITS = 0.5
# The EAD paper's defaults: a rolling mean over 5 tokens, and 10 tokens before another switch.
DEFAULT_WINDOW_TOKENS = 5
DEFAULT_MIN_DWELL_TOKENS = 10


@dataclass(frozen=True)
class RouterConfig:
    """The EAD rule. `threshold_bits` is the paper's tau, `window_tokens` its w, `min_dwell_tokens` its d_min.

    tau = +inf never uses the large model; tau = -inf always does (once the dwell allows a switch, or from the
    first token with `start=Role.LARGE`). Finite values must be >= 0: entropy in bits is never negative.
    """

    threshold_bits: float = DEFAULT_THRESHOLD_BITS
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    min_dwell_tokens: int = DEFAULT_MIN_DWELL_TOKENS
    start: Role = Role.SMALL

    def __post_init__(self) -> None:
        tau = self.threshold_bits
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau):
            raise ConfigError(f"tau must be a number of bits, got {tau!r}; try --tau 0.5")
        if math.isfinite(tau) and tau < 0:
            raise ConfigError(
                f"tau must be >= 0 bits (entropy is never negative), got {tau}; "
                "use tau=-inf to always route to the large model"
            )
        _check_int("window", self.window_tokens, minimum=1)
        _check_int("d_min", self.min_dwell_tokens, minimum=0)
        if not isinstance(self.start, Role):
            try:
                object.__setattr__(self, "start", Role(self.start))
            except ValueError:
                raise ConfigError(f"start must be 'small' or 'large', got {self.start!r}") from None

    @classmethod
    def paper(cls, tau: float = DEFAULT_THRESHOLD_BITS, window: int = DEFAULT_WINDOW_TOKENS,
              d_min: int = DEFAULT_MIN_DWELL_TOKENS, start: Role | str = Role.SMALL) -> RouterConfig:
        """The same config under the paper's short names."""
        return cls(threshold_bits=tau, window_tokens=window, min_dwell_tokens=d_min, start=start)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a Hugging Face hub id, a local HF folder, or a .gguf file."""

    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(f"a model must be a hub id, a folder or a .gguf file, got {self.source!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Where and how the models run. `device`/`dtype` None pick cuda+bfloat16 when available, else cpu+float32.

    `backend`: "hf" runs the transformers models eagerly; "native" runs ead's own decoder (ead.models) with a
    preallocated KV cache and, on CUDA with `cuda_graphs`, the one-token decode step as a replayed CUDA graph
    (with `fused_kernels`, the elementwise parts of each step compiled by torch.compile into few kernels);
    "llamacpp" runs .gguf files through llama.cpp on the CPU (`ead.backends.llamacpp`, `pip install
    'ead[llamacpp]'`), about 6x faster than hf there; the pair must be loaded for it (`load_pair(...,
    backend=...)`). "auto" picks native on CUDA when both models are of a family it implements; on CPU it
    picks llamacpp for a pair of .gguf files when llama-cpp-python is installed, else hf (the reference the
    tests compare against). `max_seq_tokens` caps prompt plus generated tokens; None means each model's
    max_position_embeddings, and for native and llamacpp at most 4096 (their caches are allocated up front).
    `lookahead` (native, on CUDA): launch a group's next round before the host reads the current one, so the
    device does not wait through the host's work between rounds (`ead.engine.BatchEngine.step`).
    """

    device: str | None = None
    dtype: str | None = None
    backend: str = "auto"
    cuda_graphs: bool = True
    fused_kernels: bool = True
    max_seq_tokens: int | None = None
    lookahead: bool = True

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("cuda_graphs", "fused_kernels", "lookahead"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.max_seq_tokens is not None:
            _check_int("max_seq_tokens", self.max_seq_tokens, minimum=2)  # a prompt token and a generated one


BACKENDS = ("auto", "hf", "native", "llamacpp")


DTYPES = {"float32", "bfloat16", "float16"}


# How tokens are made: "ead" the paper's switching rule; "speculative" the small model drafts and the large one
# verifies every token (the large model's output, exactly); "hybrid" the EAD rule picks the segments and large
# segments are written by speculation (see ead.speculative).
MODES = ("ead", "speculative", "hybrid")

# How a batch's rounds are chosen (ead.engine.BatchEngine): "exact" keeps every row's output what it is alone;
# "throughput" lets a large round carry the rows in small mode too, aiming at large-only throughput or better.
SCHEDULES = ("exact", "throughput")
# The throughput schedule's phases of large rounds, (high, low): see ead.engine.BatchEngine's `large_phase`.
LARGE_PHASE = (0.5, 0.2)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Drafting for the "speculative" and "hybrid" modes. The small model drafts up to `max_draft_tokens`
    (gamma) tokens per large-model pass; with `draft_confidence` set, a row also stops drafting after a token
    whose small-model top-1 probability (raw logits, temperature 1) is below it (adaptive draft length, as
    transformers' assistant confidence threshold). None drafts `max_draft_tokens` every time."""

    max_draft_tokens: int = 4
    draft_confidence: float | None = None

    def __post_init__(self) -> None:
        _check_int("gamma", self.max_draft_tokens, minimum=1)
        c = self.draft_confidence
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1):
            raise ConfigError(f"draft_confidence must be a probability in [0, 1] or None (off), got {c!r}")


@dataclass(frozen=True)
class EADConfig:
    """Everything one ead process needs. `small`/`large` None means the default pair."""

    small: ModelSpec | None = None
    large: ModelSpec | None = None
    router: RouterConfig = field(default_factory=RouterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if (self.small is None) != (self.large is None):
            raise ConfigError("pass both --small and --large, or neither for the default pair")
