"""Engine: two model runners and the EAD rule. It knows token ids, routing and timing, nothing about text
formats or devices beyond what the runners expose.

`Engine.step` alone moves the loop, one generated token per call. The runners are opaque: any object with
`reset()`, `seen` and `feed(ids) -> (V,) logits` works, so a faster backend replaces them without touching
the rule here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ead.config import EngineConfig, Role, RouterConfig
from ead.errors import CacheCapacityError
from ead.metrics import GenerateResult, StepRecord, SwitchEvent, Trace, summarize
from ead.pair import ModelPair, Prompt
from ead.router import Router, RoutingPolicy, TokenSignals, token_signals
from ead.runner import build_runner, choose_backend
from ead.sampling import SamplingParams, sample_next
from ead.stopping import StopChecker


@dataclass
class Sequence:
    """One request in flight: its ids (prompt then generated), routing state, sampler state and trace."""

    prompt_ids: list[int]
    sampling: SamplingParams
    router: RoutingPolicy
    stopper: StopChecker
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.ids[len(self.prompt_ids):]


class Engine:
    def __init__(self, pair: ModelPair, cfg: RouterConfig | None = None,
                 engine_cfg: EngineConfig | None = None) -> None:
        self.pair = pair
        self.cfg = cfg or RouterConfig()
        self.engine_cfg = engine_cfg or EngineConfig()
        vocab = min(pair.small.model.config.vocab_size, pair.large.model.config.vocab_size)
        models = {Role.SMALL: pair.small.model, Role.LARGE: pair.large.model}
        self.backend = choose_backend(list(models.values()), self.engine_cfg.backend, pair.device)  # hf | native
        self.runners = {role: build_runner(m, vocab, self.backend, self.engine_cfg) for role, m in models.items()}
        self.max_seq_tokens = min(r.max_seq_tokens for r in self.runners.values())

    def start(self, prompt_ids: list[int], sampling: SamplingParams,
              router: RoutingPolicy | None = None) -> Sequence:
        """Begin a sequence: check it fits, clear both caches (nothing is computed until a model is needed).
        `router` replaces the paper's rule (`Router(self.cfg)`) for this sequence."""
        if len(prompt_ids) >= self.max_seq_tokens:
            raise CacheCapacityError(
                f"the prompt has {len(prompt_ids)} tokens but the models' context holds {self.max_seq_tokens}; "
                "shorten the prompt")
        for runner in self.runners.values():
            runner.reset()
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.pair.device).manual_seed(sampling.seed)
        eos = () if sampling.ignore_eos else self.pair.eos_token_ids
        stopper = StopChecker(self.pair.decode, eos, sampling.stop, sampling.max_new_tokens)
        return Sequence(prompt_ids=list(prompt_ids), sampling=sampling, router=router or Router(self.cfg), stopper=stopper,
                        generator=generator, ids=list(prompt_ids))

    def step(self, seq: Sequence) -> StepRecord:
        """Generate one token of `seq` with the model the router chose, then let the router choose again."""
        t0 = time.perf_counter()
        role = seq.router.active
        runner = self.runners[role]
        n_generated = len(seq.ids) - len(seq.prompt_ids)

        # 1. The active model reads every token it has not seen, in one forward pass: the prompt on its first
        #    use, one token in steady state, and after a switch the tokens the other model wrote (catch-up).
        fed = seq.ids[runner.seen:]
        logits = runner.feed(fed)                                   # (V,) float32
        unseen_generated = min(len(fed), n_generated)  # the rest of `fed` is prompt
        seq.trace.prefill_tokens[role.value] += len(fed) - unseen_generated

        # 2. The routing signal on the raw logits, and 3. the token from the sampler, both on the device.
        signals = token_signals(logits[None])[0]  # (4,)
        token = sample_next(logits[None], seq.sampling, seq.generator)[0]

        # 4. The one host sync per token: the router branches on numbers. (ids < 2**24 are exact in float32.)
        *values, token_id = torch.cat([signals, token.to(signals.dtype)[None]]).tolist()
        token_id = int(token_id)
        sig = TokenSignals.from_values(values)
        bits_f = sig.entropy_bits

        # 5. Record the token, the switch that let this model write it, and route the next token.
        if n_generated > 0 and role is not seq.trace.steps[-1].role:
            seq.trace.switches.append(SwitchEvent(index=n_generated, to=role, catchup_tokens=unseen_generated))
        seq.ids.append(token_id)
        seq.router.observe(sig)
        record = StepRecord(index=n_generated, token_id=token_id, role=role, entropy_bits=bits_f,
                            mean_bits=seq.router.last_mean_bits, fed_tokens=len(fed),
                            step_ms=(time.perf_counter() - t0) * 1e3)
        seq.trace.steps.append(record)

        # 6. Stop on an end-of-sequence id, a stop string, max_new_tokens or a full context.
        seq.finish_reason = seq.stopper.update(seq.generated)
        if seq.finish_reason is None and len(seq.ids) >= self.max_seq_tokens:
            seq.finish_reason = "length"
        return record

    def result(self, seq: Sequence, seconds: float) -> GenerateResult:
        stats = summarize(seq.trace, self.pair.small.params, self.pair.large.params, seconds)
        return GenerateResult(text=seq.stopper.text, token_ids=seq.generated, prompt_token_ids=seq.prompt_ids,
                              finish_reason=seq.finish_reason or "interrupted", trace=seq.trace, stats=stats)

    def generate(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                 on_step: Callable[[Sequence, StepRecord], None] | None = None,
                 router: RoutingPolicy | None = None) -> GenerateResult:
        """Run one sequence to the end. `on_step` sees every token as it is made (streaming, progress)."""
        seq = self.start(prompt_ids, sampling or SamplingParams(), router)
        t0 = time.perf_counter()
        while seq.finish_reason is None:
            record = self.step(seq)
            if on_step is not None:
                on_step(seq, record)
        return self.result(seq, time.perf_counter() - t0)


def generate(pair: ModelPair, prompts: Prompt | list[Prompt], config: RouterConfig | None = None,
             sampling: SamplingParams | None = None) -> list[GenerateResult]:
    """EAD on each input in turn: a plain prompt (str) or chat messages (list of {'role', 'content'} dicts),
    or a list of those. Returns one GenerateResult per input, in order."""
    engine = Engine(pair, config)
    batch = [prompts] if isinstance(prompts, str) or _is_messages(prompts) else list(prompts)
    return [engine.generate(pair.encode(p), sampling) for p in batch]


def _is_messages(x: object) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], dict)
