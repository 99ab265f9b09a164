"""What a generation leaves behind: one StepRecord per token, the Trace of them, and the summary numbers.

Only this module derives summaries (large-model share f, the paper's cost ratio, switches, tokens/s), so the
CLI, the server and the eval harness all report the same figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ead.config import Role


@dataclass(frozen=True)
class StepRecord:
    """One generated token.

    `entropy_bits` is the entropy of the distribution the token was drawn from (raw logits of `role`),
    `mean_bits` the rolling mean after it. `fed_tokens` is how many tokens `role` processed in the forward
    pass that produced these logits: 1 in steady state, the prompt on its first use, the catch-up after a switch.
    """

    index: int
    token_id: int
    role: Role
    entropy_bits: float
    mean_bits: float
    fed_tokens: int
    step_ms: float


@dataclass(frozen=True)
class SwitchEvent:
    """The model changed at token `index`: `to` wrote it after `catchup_tokens` generated tokens it had missed."""

    index: int
    to: Role
    catchup_tokens: int


@dataclass(frozen=True)
class VerifyEvent:
    """One large-model verification pass (speculative and hybrid modes): the small model drafted `drafted`
    tokens, the large one accepted the first `accepted`, and `emitted` tokens joined the text from token `index`
    on: the accepted ones and the large model's own next token, fewer when the text ended or the router handed
    over to the small model first."""

    index: int
    drafted: int
    accepted: int
    emitted: int


@dataclass
class Trace:
    steps: list[StepRecord] = field(default_factory=list)
    switches: list[SwitchEvent] = field(default_factory=list)
    prefill_tokens: dict[str, int] = field(default_factory=lambda: {"small": 0, "large": 0})
    verifications: list[VerifyEvent] = field(default_factory=list)


@dataclass(frozen=True)
class GenerateStats:
    """Summary of one generation. `large_share` is the paper's f; `cost_ratio` its parameter-weighted cost
    ((1-f)*P_small + f*P_large) / P_large, 1.0 being the large model alone; with speculation a large token costs
    less than a large pass, and `cost_ratio` counts it as written by the large model (an upper bound).

    Speculation only (None or 0 under EAD): `verify_passes` large-model passes checked `draft_tokens` drafted
    tokens and accepted `accepted_tokens`; `acceptance_rate` = accepted / drafted, `mean_accepted_tokens` =
    accepted per pass, `tokens_per_large_pass` = tokens the passes added to the text, per pass."""

    tokens_small: int
    tokens_large: int
    large_share: float
    switches: int
    catchup_tokens: int
    prefill_tokens_small: int
    prefill_tokens_large: int
    params_small: int
    params_large: int
    cost_ratio: float
    seconds: float
    tokens_per_s: float
    verify_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float | None = None
    mean_accepted_tokens: float | None = None
    tokens_per_large_pass: float | None = None


def cost_ratio(large_share: float, params_small: int, params_large: int) -> float:
    """The EAD paper's compute cost relative to the large model alone."""
    return ((1 - large_share) * params_small + large_share * params_large) / params_large


def summarize(trace: Trace, params_small: int, params_large: int, seconds: float) -> GenerateStats:
    n = len(trace.steps)
    v = trace.verifications
    drafted, accepted = sum(e.drafted for e in v), sum(e.accepted for e in v)
    n_large = sum(1 for s in trace.steps if s.role is Role.LARGE)
    f = n_large / n if n else 0.0
    return GenerateStats(
        tokens_small=n - n_large,
        tokens_large=n_large,
        large_share=f,
        switches=len(trace.switches),
        catchup_tokens=sum(s.catchup_tokens for s in trace.switches),
        prefill_tokens_small=trace.prefill_tokens["small"],
        prefill_tokens_large=trace.prefill_tokens["large"],
        params_small=params_small,
        params_large=params_large,
        cost_ratio=cost_ratio(f, params_small, params_large),
        seconds=seconds,
        tokens_per_s=n / seconds if seconds > 0 else 0.0,
        verify_passes=len(v),
        draft_tokens=drafted,
        accepted_tokens=accepted,
        acceptance_rate=accepted / drafted if drafted else None,
        mean_accepted_tokens=accepted / len(v) if v else None,
        tokens_per_large_pass=sum(e.emitted for e in v) / len(v) if v else None,
    )


@dataclass(frozen=True)
class GenerateResult:
    """One input's output. `token_ids` are the generated ids (an end-of-sequence id included when one ended
    the text); `text` is their decoding without special tokens and cut before any stop string."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence id or stop string), "length" or "interrupted"
    trace: Trace
    stats: GenerateStats

    def to_dict(self) -> dict:
        d = asdict(self)
        for s in d["trace"]["steps"]:
            s["role"] = s["role"].value
        for s in d["trace"]["switches"]:
            s["to"] = s["to"].value
        return d
