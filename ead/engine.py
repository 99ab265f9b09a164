"""Engine: two model runners and the EAD rule, for many sequences at once. It knows token ids, routing,
scheduling and timing, nothing about text formats or devices beyond what the runners expose.

`BatchEngine` holds up to `max_batch` sequences in flight, each in a slot of both models' caches, with its own
router; `step()` advances them. The runners are opaque (see `ead.runner.HFBatchRunner` for their interface),
so a faster backend replaces them without touching the rule here. `Engine` is the one-sequence view of it.

Scheduling. A decode step of a memory-bound model costs about one read of its weights however many rows take
part. Rows are therefore stepped in two groups, the rows the router gives to the small model and those it
gives to the large one, never both in one round. The large group steps once it holds at least `large_fill`
of the running rows (or is alone); until then the small group steps, cheaply, and its rows join the large
group as their routers switch, so that a large step serves many rows. A group that has waited longer than
`max_wait_steps` large-model steps is stepped next whatever its size, which bounds the latency this adds to a
row. The engine counts rounds and rows per group in `rounds` and `rows_stepped`; BENCHMARKS.md has what this
gives against large-only at each batch size, and why rows routed independently cannot always win. At batch 1
there is only ever one group, and the rule is the paper's, token by token.

That is the "exact" schedule: every row writes what it writes alone. The "throughput" schedule (`schedule`)
lets a large round carry the rows in small mode as well ("ride-along": they would only wait through it, and a
memory-bound step costs about the same for more rows), and picks the round that advances more rows per second,
so that no round is slower per token than a round of large-only decoding; the rows then get some of the large
model's tokens they were not routed to, and their text depends on the company they keep (see `__init__`). Its
rule works from fitted costs; a guard checks it against the clock (`_guard`): when the last `guard_rounds`
rounds wrote fewer tokens per second than large rounds alone would have, every row rides along for a while
(large-only decoding, the large model's text), and EAD rounds are tried again after it, each failed try
doubling the wait.

With the models on two GPUs (`concurrent`), neither waits for the other: the large group's step is launched on
its GPU, and the small group steps on the other, again and again, until that step is done (`_run_ahead`).

Lookahead (`EngineConfig.lookahead`, native runner on CUDA, greedy rows, mode "ead" on one device):
a round's next round, for the same rows, is launched before the host reads the round, fed the tokens it gives
each row while they are still on the device (`_look_ahead`). The device then works through the host's turn (the
routers, stop checks, records and the next launch) instead of waiting for it. The next `step` runs that round
if the scheduler picks the same rows (rows that finished or switched meanwhile only drop out of it); else it is
discarded, a step of device time lost (`_resume`). So a round runs ahead only where the next is likely the same
(`_likely_run`): under the exact schedule only while the other group is empty, and a large one only where no
row's router can switch at the next token; under the throughput schedule also within a spell of the guard or a
phase of large rounds that lasts, and wherever the rule would pick the same group with a few rows switched.

Modes (`mode`): "ead" is the above. "speculative" gives every token to the large model through speculative
decoding (`ead.speculative`: the small model drafts, the large one verifies a draft per pass), so the text is
the large model's; "hybrid" keeps the EAD rule's segments and writes the large ones by speculation, the router
reading the large model's distribution at each kept token, as it would have without speculation. A round of
speculation may add several tokens to a row.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ead.config import LARGE_PHASE, MODES, SCHEDULES, EngineConfig, Role, RouterConfig, SpeculativeConfig
from ead.errors import CacheCapacityError, ConfigError, RequestError
from ead.metrics import GenerateResult, StepRecord, SwitchEvent, Trace, VerifyEvent, summarize
from ead.models.tensor_parallel import broadcast_from_first
from ead.pair import ModelPair, Prompt
from ead.router import Router, RoutingPolicy, ScriptedRouter, TokenSignals, token_signals
from ead.runner import HFBatchRunner, NativeBatchRunner, build_batch_runner, choose_backend
from ead.sampling import SamplingParams, sample_next
from ead.speculative import Speculator, Verdict
from ead.stopping import StopChecker

# The throughput schedule steps the small group only when, by its cost model, that advances rows at least this
# many times faster than a large round that every row rides. The model prices a small round by its measured step
# and the large model's later catch-up, a line fitted to the large rounds; it leaves out what the rows' first
# small and large passes read of their prompts, the padding of the catch-up they bring to the large model's next
# pass, and the small model's own catch-up on what its rows rode. On an H100 at batch 64 (1.5B -> 14B shapes,
# f = 0.25, BENCHMARKS.md session 8) the model put the small rounds a median 9% ahead; the run lost 8%, much of
# it in the large model's first pass over the prompts of rows that had started small. At batch 16 every small
# round the rule took beside large-mode rows was at least 47% ahead (median 1.9-2.1x).
SMALL_ROUND_MARGIN = 1.25

@dataclass(eq=False)
class Sequence:
    """One request in flight: its ids (prompt then generated), routing state, sampler state and trace.
    `slot` is its row in both models' caches while it runs (None while waiting or after it finished)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    router: RoutingPolicy
    stopper: StopChecker
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)
    finish_reason: str | None = None
    slot: int | None = None
    t_added: float = field(default_factory=time.perf_counter)
    t_started: float | None = None
    t_finished: float | None = None
    side_generators: dict[torch.device, torch.Generator] = field(default_factory=dict)  # see generator_on

    @property
    def generated(self) -> list[int]:
        return self.ids[len(self.prompt_ids):]

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The sampler state for draws on `device`: `generator`, or for a model on another device one seeded
        alike (models on two GPUs draw from two streams, each reproducible from the seed)."""
        if self.generator is None or self.generator.device == device:
            return self.generator
        if device not in self.side_generators:
            self.side_generators[device] = torch.Generator(device=device).manual_seed(self.sampling.seed)
        return self.side_generators[device]


@dataclass(eq=False)
class _Lookahead:
    """A round launched before the round it follows was read (`BatchEngine._look_ahead`): its group, its rows in
    launch order, its (rows, 5) summary on the device, the summary's pinned host copy and the marker of its arrival,
    and its launch time (perf_counter seconds). `keep`: the rows of the summary that still count (`_resume`)."""

    role: Role
    rows: list[Sequence]
    summary: Tensor
    host: Tensor
    done: torch.cuda.Event | _Ran
    t_launch: float
    keep: list[int] = field(default_factory=list)


class BatchEngine:
    """Up to `max_batch` sequences at once, each routed on its own; more wait in a queue for a free slot.

    Not thread-safe: one thread calls `add`, `step` and `cancel` (a server runs the engine in its own thread).
    """

    def __init__(self, pair: ModelPair, cfg: RouterConfig | None = None, engine_cfg: EngineConfig | None = None,
                 max_batch: int = 16, max_wait_steps: float = 16.0, large_fill: float = 0.75, mode: str = "ead",
                 speculative: SpeculativeConfig | None = None, sync: Callable[[Tensor], Tensor] | None = None,
                 schedule: str = "exact", guard_rounds: int = 32,
                 large_phase: tuple[float, float] | None = LARGE_PHASE) -> None:
        """`sync`, for a model split across processes (ead.models.tensor_parallel): applied to each round's
        (rows, 5) summary of signals and tokens before the routers read it, e.g. `broadcast_from_first`, so
        that one rank's sampler and routers decide for all (and to the round's choice of group, which reads
        this rank's clock). A pair whose large model is split (`pair.large_tp` > 1) gets `broadcast_from_first`
        without asking.

        `schedule` (mode "ead" only): "exact" steps the two groups apart, so every row writes exactly what it
        writes alone. "throughput" lets a large round carry the rows in small mode too: each such row gets the
        large model's token, and its large cache catches up in the same pass, as after any switch. The token is
        the large model's in every respect: its record has role LARGE (it counts toward the large share), and
        the row's router observes the large model's signals for it, as for any token (the rolling mean covers
        the last w generated tokens, whichever model wrote them). Nothing else about the router changes: it
        observes the token as it observes any, so its mode changes only where its rule says so on the new mean,
        and the token counts toward the dwell of the segment it is in (the small one); the row goes back to the
        small group, not into a large segment (a budget router's share counts its routed tokens, which it
        controls, not these, which cost no extra round).
        A round is chosen by rows per second, each round charged what it costs the large model too: a small
        round's tokens are fed to the large model later, in the catch-up of the next large round, so it costs
        T_small + c * n_small, where a large-only round costs T_large for n_all rows. The small group steps
        when n_small / (T_small + c * n_small) > m * n_all / T_large (m = SMALL_ROUND_MARGIN, for the costs the
        model leaves out), else the large round carries every row, unless
        the large group has waited more than `max_wait_steps` large steps, when it goes next. T_small is the
        measured small step (`step_seconds`); T_large and c, the seconds per catch-up token, are fitted to the
        large rounds' times against the catch-up tokens they fed (`large_costs`). By those costs every round, the
        catch-up it causes included, then advances at least as many rows per second as a large-only round
        (measured on an H100, rounds cost more than the fit says: BENCHMARKS.md; hence the guard). A row's text
        now depends on the rounds it shares with others, hence on timing: greedy runs need not repeat exactly.

        `guard_rounds` (throughput schedule, one device; 0 = off): the window of the guard (`_guard`) that holds
        the schedule to large-only throughput by the clock, whatever the fitted costs say.

        `large_phase` (throughput schedule; default `LARGE_PHASE`, None = off), (high, low): once the large group
        holds at least `high` of the running rows, or has waited more than `max_wait_steps` large steps, large
        rounds that every row rides go on until it holds less than `low` of them; between phases, the rule above.
        Rows then leave their large segments together, so the small rounds after a phase are full ones. On an
        H100 (BENCHMARKS.md, session 6), f = 0.25: 1.13x large-only at batch 16 and 0.87x at 64, against 1.01x
        and 0.73x without phases; f = 0.43: 0.99x and 1.00x against 0.89x and 0.84x."""
        if sync is None and getattr(pair, "large_tp", 1) > 1:
            sync = broadcast_from_first
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if schedule != "exact" and mode != "ead":
            raise ConfigError(f"schedule {schedule!r} applies to mode 'ead' only (speculation writes large segments "
                              f"in verification passes of their own), got mode {mode!r}; use schedule 'exact'")
        if sync is not None and mode != "ead":
            raise ConfigError(f"a tensor-parallel sync supports mode 'ead' only so far, got mode {mode!r}")
        self.sync = sync
        self.pair = pair
        self.cfg = cfg or RouterConfig()
        self.engine_cfg = engine_cfg or EngineConfig()
        if isinstance(max_wait_steps, bool) or not isinstance(max_wait_steps, (int, float)) or max_wait_steps < 0:
            raise ConfigError(f"max_wait_steps must be a number >= 0, got {max_wait_steps!r}")
        if isinstance(guard_rounds, bool) or not isinstance(guard_rounds, int) or guard_rounds < 0:
            raise ConfigError(f"guard_rounds must be an integer >= 0 (0 = no guard), got {guard_rounds!r}")
        if large_phase is not None and not (
                isinstance(large_phase, (tuple, list)) and len(large_phase) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in large_phase)
                and 0 <= large_phase[1] <= large_phase[0] <= 1):
            raise ConfigError(f"large_phase must be (high, low) with 0 <= low <= high <= 1, got {large_phase!r}")
        if isinstance(large_fill, bool) or not isinstance(large_fill, (int, float)) or not 0 <= large_fill <= 1:
            raise ConfigError(f"large_fill must be a fraction in [0, 1], got {large_fill!r}")
        self.max_batch, self.max_wait_steps, self.large_fill = max_batch, max_wait_steps, large_fill
        self.schedule = schedule
        models = {Role.SMALL: pair.small.model, Role.LARGE: pair.large.model}
        vocab = min(_vocab_size(m) for m in models.values())
        self.backend = choose_backend(list(models.values()), self.engine_cfg.backend, pair.device)
        self.runners = {role: build_batch_runner(m, vocab, self.backend, self.engine_cfg, max_batch)
                        for role, m in models.items()}
        # The native runner computes routing signals inside its graphs; speculation's verification reads them
        # from full logits, a dozen small kernels that a compiled function on CUDA makes one or two.
        fuse = self.backend == "native" and torch.device(pair.device).type == "cuda" and self.engine_cfg.fused_kernels
        self.token_signals = torch.compile(token_signals, dynamic=True) if fuse else token_signals
        self.max_seq_tokens = min(r.max_seq_tokens for r in self.runners.values())
        self.mode, self.speculator = mode, None
        # Models on two GPUs: the small group steps while the large group's step runs (see `_run_ahead`).
        self.devices = {role: _device(m) for role, m in models.items()}
        devices = set(self.devices.values())
        self.concurrent = len(devices) == 2 and all(d is not None and d.type == "cuda" for d in devices)
        if mode != "ead" and len(devices) > 1:
            raise ConfigError(f"mode {mode!r} compares both models' distributions on one device, but the models sit "
                              f"on {sorted(map(str, devices))}; load both on one device (or use mode 'ead')")
        if mode != "ead":
            if not all(hasattr(r, "truncate") for r in self.runners.values()):
                raise ConfigError(f"mode {mode!r} needs runners that can roll a cache back: use backend 'hf', "
                                  f"'native' or 'llamacpp' (backend {self.backend!r} has no speculation yet)")
            self.speculator = Speculator(self.runners[Role.SMALL], self.runners[Role.LARGE],
                                         speculative or SpeculativeConfig(), self.max_seq_tokens, self.token_signals)
        self.queue: deque[Sequence] = deque()
        self.slots: list[Sequence | None] = [None] * max_batch
        # Seconds per step of each model, measured (moving average); until measured, proportional to size.
        self.step_seconds = {Role.SMALL: pair.small.params / pair.large.params, Role.LARGE: 1.0}
        self.measured = {Role.SMALL: False, Role.LARGE: False}
        self.waited = {Role.SMALL: 0.0, Role.LARGE: 0.0}  # seconds each group has waited with rows in it
        self.rounds = {Role.SMALL: 0, Role.LARGE: 0}
        self.rows_stepped = {Role.SMALL: 0, Role.LARGE: 0}
        self.ride_along_tokens = 0  # large-model tokens of rows in small mode (the throughput schedule)
        # A lookahead overlaps host work with device work; on a CPU, which runs work as it is queued, it only adds
        # the discarded rounds. Rounds launched ahead and run, rounds launched ahead and discarded.
        self.lookahead = self.engine_cfg.lookahead and all(d is not None and d.type == "cuda" for d in devices)
        self.pending: _Lookahead | None = None
        self.lookahead_rounds, self.lookahead_discarded = 0, 0
        self.t_read = 0.0  # when the host last read a round's summary
        # Large rounds' (catch-up tokens fed, seconds), as decayed sums of 1, x, y, x*x and x*y (`large_costs`).
        self.large_fit = [0.0] * 5
        self.catch_up_slope: float | None = None  # the last slope the fit found (`large_costs`)
        # The throughput schedule's guard (`_guard`): the EAD rounds of the current try as (tokens, seconds,
        # running rows); the large-only rounds still to run, the length of the next such spell, how many rounds
        # spells forced; the seconds of the last spell's rounds (its first, the riders' catch-up, left out);
        # whether this round is one of a spell.
        self.guard_rounds = guard_rounds
        self.recent: list[tuple[int, float, int]] = []
        self.fallback_left, self.fallback_len, self.fallback_rounds = 0, guard_rounds, 0
        self.spell_rows = 0.0  # the running rows of the try whose loss started the spell
        self.spell_seconds: list[float] = []
        self.forced = False
        self.large_phase = tuple(large_phase) if large_phase is not None else None
        self.in_phase = False  # within a phase of large rounds (`large_phase`)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def has_work(self) -> bool:
        return bool(self.queue) or self.running > 0

    def warm_up(self, longest: int) -> None:
        """Capture ahead every CUDA graph that sequences of up to `longest` tokens can need, so that no capture
        (a few forward passes each) falls inside a timed or latency-sensitive run."""
        for role, runner in self.runners.items():
            if hasattr(runner, "capture_graphs"):  # speculation's verification passes are the large model's
                verify = self.speculator is not None and role is Role.LARGE
                runner.capture_graphs(min(longest, runner.max_seq_tokens), verify=verify)

    def add(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
            router: RoutingPolicy | None = None) -> Sequence:
        """Queue a sequence; it starts at the next `step` with a free slot. `router` replaces the paper's rule
        (`Router(self.cfg)`) for this sequence. Raises CacheCapacityError at once for a prompt that cannot fit."""
        sampling = sampling or SamplingParams()
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_seq_tokens:
            raise CacheCapacityError(
                f"the prompt has {len(prompt_ids)} tokens but the models' context holds {self.max_seq_tokens}; "
                "shorten the prompt")
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.pair.device).manual_seed(sampling.seed)
        eos = () if sampling.ignore_eos else self.pair.eos_token_ids
        stopper = StopChecker(self.pair.decode, eos, sampling.stop, sampling.max_new_tokens)
        seq = Sequence(prompt_ids=list(prompt_ids), sampling=sampling, router=router or Router(self.cfg),
                       stopper=stopper, generator=generator, ids=list(prompt_ids))
        self.queue.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` now (finish_reason "cancelled") and free its slot; a finished sequence is left as it is."""
        if seq.finish_reason is not None:
            return
        if seq in self.queue:
            self.queue.remove(seq)
        seq.finish_reason = "cancelled"
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        seq.t_finished = time.perf_counter()
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None

    def _admit(self) -> None:
        """Move waiting sequences into free slots, lowest first, so busy rows stay packed at the bottom and the
        forward passes cover as few cache rows as possible."""
        for slot in range(self.max_batch):
            if not self.queue:
                return
            if self.slots[slot] is None:
                seq = self.queue.popleft()
                for runner in self.runners.values():
                    runner.reset(slot)
                seq.slot, seq.t_started = slot, time.perf_counter()
                self.slots[slot] = seq

    def _choose_group(self, groups: dict[Role, list[Sequence]]) -> Role:
        """Which group steps this round (see the module docstring, and `__init__` for the throughput rule)."""
        if self.schedule == "throughput":  # a small round advances the small rows, a large round every row
            running = len(groups[Role.SMALL]) + len(groups[Role.LARGE])
            if self.fallback_left and not self.spell_rows / 2 <= running <= 2 * self.spell_rows:
                # The verdict was for a batch of another size (a server's load came or went): judge this one anew.
                self.fallback_left, self.fallback_len, self.spell_seconds = 0, self.guard_rounds, []
            self.forced = self.fallback_left > 0
            if self.forced:  # the guard found EAD rounds slower than large-only ones: large-only for a while
                self.fallback_left -= 1
                self.fallback_rounds += 1
                return Role.LARGE
            role, self.in_phase = self._throughput_rule(len(groups[Role.SMALL]), len(groups[Role.LARGE]),
                                                        self.waited[Role.LARGE], self.in_phase)
            return role
        nonempty = [role for role, rows in groups.items() if rows]
        if len(nonempty) == 1:
            return nonempty[0]
        bound = self.max_wait_steps * self.step_seconds[Role.LARGE]
        starved = [role for role in nonempty if self.waited[role] > bound]
        if starved:
            return max(starved, key=lambda role: self.waited[role])
        n_large, n_small = len(groups[Role.LARGE]), len(groups[Role.SMALL])
        return Role.LARGE if n_large >= self.large_fill * (n_large + n_small) else Role.SMALL

    def _throughput_rule(self, n_small: int, n_large: int, waited_large: float, in_phase: bool) -> tuple[Role, bool]:
        """The throughput schedule's choice outside a spell of the guard, for groups of these sizes after the large
        one waited `waited_large` seconds: (the group that steps, whether a phase of large rounds is on). No side
        effects, so that `_likely_run` can ask what the next round will be."""
        n_all = n_small + n_large
        bound = self.max_wait_steps * self.step_seconds[Role.LARGE]
        if self.large_phase is not None:
            high, low = self.large_phase
            if n_large and (waited_large > bound or n_large >= high * n_all):
                in_phase = True
            elif n_large < low * n_all:
                in_phase = False
            if in_phase:
                return Role.LARGE, True
        if n_large and waited_large > bound:
            return Role.LARGE, in_phase
        t_large, per_token = self.large_costs()
        small = n_small / (self.step_seconds[Role.SMALL] + per_token * n_small)
        faster = small > SMALL_ROUND_MARGIN * n_all / t_large
        return (Role.SMALL if faster else Role.LARGE), in_phase

    def step(self) -> list[tuple[Sequence, StepRecord]]:
        """One round: one new token for each sequence of the chosen group (under the throughput schedule a large
        round gives one to every sequence; on two GPUs the small group may take several, see `_run_ahead`).
        Sequences that finish free their slot; queued ones join at the next round. The round may be the one the
        last call launched ahead (see the module docstring). Returns (sequence, record) per new token."""
        self._admit()
        active = [seq for seq in self.slots if seq is not None]
        if not active:
            self._resume([], {})  # a lookahead of rows that have all finished is dropped
            return []
        if self.mode == "speculative":  # every token is the large model's
            groups = {Role.SMALL: [], Role.LARGE: active}
        else:
            groups = {role: [seq for seq in active if seq.router.active is role] for role in Role}
        both = all(groups.values())
        if self.concurrent and both and self.sync is None:
            return self._run_ahead(groups)
        if self.concurrent and both:  # ranks must issue their collectives in one order: both groups, one sync
            roles = [Role.LARGE, Role.SMALL]
        else:  # one device: one group per round
            roles = [self._choose_group(groups)]
            if self.sync is not None and (both or (self.schedule == "throughput" and groups[Role.SMALL])):
                # The choice reads this rank's clock (waits, step times), which differs between ranks: rank 0's
                # stands for all, or the ranks would step different models and their collectives would not meet.
                # Under the throughput schedule a large round may carry rows that are all in small mode: a choice.
                first = self.sync(torch.tensor([float(roles[0] is Role.LARGE)], device=self.pair.device))
                roles = [Role.LARGE if first.item() else Role.SMALL]
        t0 = t_round = time.perf_counter()
        if roles == [Role.LARGE] and self.speculator is not None:
            # The small model drafts and the large one verifies every row's draft in one pass (one host sync
            # per draft step and one for the verification, see ead.speculative).
            rows = groups[Role.LARGE]
            verdicts = self.speculator.run(rows)
            step_ms = self._account(Role.LARGE, groups, rows, t0)
            return [event for seq, v in zip(rows, verdicts) for event in self._emit(seq, v, step_ms)]
        rows = {role: groups[role] for role in roles}
        if roles == [Role.LARGE] and self.schedule == "throughput":
            rows[Role.LARGE] = active  # the rows in small mode ride along (see __init__)
            self.ride_along_tokens += len(groups[Role.SMALL])
        ahead = self._resume(roles, rows)  # the round launched ahead in the last step, if it is this one
        if ahead is None:
            # role -> (feeds, summary)
            launched = {role: self._launch(rows[role], self.runners[role]) for role in roles}
            if self.sync is not None:
                launched = {role: (feeds, self.sync(summary.contiguous()))
                            for role, (feeds, summary) in launched.items()}
            copies = {role: _copy_to_host(summary) for role, (_, summary) in launched.items()}  # role -> (host, done)
        else:  # it fed each row the last round's token; it ran once the device was done with that round
            t0 = max(ahead.t_launch, self.t_read)
            launched = {ahead.role: ([seq.ids[-1:] for seq in ahead.rows], ahead.summary)}
            copies = {ahead.role: (ahead.host, ahead.done)}
        if len(roles) == 1:  # queued behind this round's copy to the host, so that the host waits for this round only
            self.pending = self._look_ahead(roles[0], rows[roles[0]], launched[roles[0]][1], groups)

        # 4. The one host sync per round, on this round's copy (not on a lookahead queued after it): the routers
        #    branch on numbers. (ids < 2**24 are exact in float32.)
        for _, done in copies.values():
            done.synchronize()
        values = {role: host.tolist() for role, (host, _) in copies.items()}
        self.t_read = time.perf_counter()
        if ahead is not None:
            values[ahead.role] = [values[ahead.role][i] for i in ahead.keep]
        stepped = {seq for role in roles for seq in rows[role]}
        waiting = {role: [seq for seq in groups[role] if seq not in stepped] for role in Role}

        guard = self.schedule == "throughput" and self.guard_rounds and len(roles) == 1
        events, large_prefill = [], False
        for role, (feeds, _) in launched.items():
            prefill = _reads_prompt(rows[role], feeds)
            large_prefill |= role is Role.LARGE and prefill
            step_ms = self._account(role, waiting, rows[role], t0, measure=not prefill)
            if role is Role.LARGE and len(roles) == 1 and not prefill:
                self._fit_large(sum(map(len, feeds)) - len(feeds), step_ms / 1e3)
            for seq, fed, row in zip(rows[role], feeds, values[role]):
                events.append((seq, self._advance(seq, role, fed, row, step_ms)))
        if guard and not large_prefill:  # large-only decoding pays the large model's prefill too
            self._guard(len(events), time.perf_counter() - t_round, len(active))
        return events

    def reset_guard(self) -> None:
        """Start the guard afresh (a new workload): no spell pending, the next spell one try long, no phase of
        large rounds (`large_phase`). The last spell's measured T_large is kept: it depends on the batch, not on
        the rows."""
        self.recent, self.forced, self.in_phase = [], False, False
        self.fallback_left, self.fallback_len = 0, self.guard_rounds

    def _guard(self, tokens: int, seconds: float, running: int) -> None:
        """Hold the throughput schedule to large-only throughput by the clock. Each EAD round adds (its tokens,
        its seconds from its launch to its tokens booked, the rows running) to the current try. After
        `guard_rounds` of them the try is judged against large-only decoding of the same rows: T_large seconds
        a round for one token each, T_large measured the same way over the last spell of large-only rounds
        (before the first spell, the fitted cost of a large round without catch-up, `large_costs`, which leaves
        out the host's work after the round and so judges strictly). If the try wrote fewer tokens per second,
        the next `fallback_len` rounds are large rounds that every row rides (`_choose_group`), and the next
        spell is twice as long (at most 64 tries' length); else the next spell is back to one try's length.
        Either way a new try starts, judged on its own rounds and the catch-ups they cause. A round in which the
        large model reads prompt tokens (a row's first large round) is left out, spell or try: large-only decoding
        pays that prefill too, and it would count against whichever try it fell in (with it, the first try of a
        batch-16 run on an H100 failed on the batch's prefill alone, and a spell followed).
        A verdict holds for a batch of about the size it judged: a spell ends early once the running rows fall
        below half or rise above twice the try's (`_choose_group`), and the next spell is one try long again. A
        server's spell, up to 64 tries long, learnt at 64 rows, would otherwise hold large-only decoding at 4,
        where EAD wins (BENCHMARKS.md)."""
        if self.forced:  # a spell's round: measures T_large for the next verdict
            self.spell_seconds.append(seconds)
            self.recent.clear()
            return
        self.recent.append((tokens, seconds, running))
        if len(self.recent) < self.guard_rounds:
            return
        spell = self.spell_seconds[1:]
        t_large = sum(spell) / len(spell) if spell else self.large_costs()[0]
        written = sum(t for t, _, _ in self.recent) / sum(s for _, s, _ in self.recent)
        rows = sum(n for _, _, n in self.recent) / len(self.recent)  # running, on average over the try
        if written < rows / t_large:  # large-only decoding: one token a row per T_large
            self.fallback_left, self.spell_seconds, self.spell_rows = self.fallback_len, [], rows
            self.fallback_len = min(2 * self.fallback_len, 64 * self.guard_rounds)
        else:
            self.fallback_len = self.guard_rounds
        self.recent.clear()

    def _run_ahead(self, groups: dict[Role, list[Sequence]]) -> list[tuple[Sequence, StepRecord]]:
        """A round with the models on two GPUs. The large group's step is launched on its device (a graph
        replay: nothing waits for it), then the small group steps on the other device, each step synced on that
        device alone, until the large step is done or `run_ahead_cap` small steps have run; the large group's
        tokens are read last. A row that its router hands to the large model leaves the small group for the next
        round, so each row's tokens still come one after another. Returns (sequence, record) per new token."""
        t0 = time.perf_counter()
        feeds, summary = self._launch(groups[Role.LARGE], self.runners[Role.LARGE])
        done, t_done = self._mark_done(Role.LARGE), None
        events, small, nobody = [], groups[Role.SMALL], {Role.SMALL: [], Role.LARGE: []}  # nobody waits
        for _ in range(self.run_ahead_cap()):
            t1 = time.perf_counter()
            small_feeds, small_summary = self._launch(small, self.runners[Role.SMALL])
            values = small_summary.tolist()  # a host sync on the small model's device only
            step_ms = self._account(Role.SMALL, nobody, small, t1, measure=not _reads_prompt(small, small_feeds))
            events += [(seq, self._advance(seq, Role.SMALL, fed, row, step_ms))
                       for seq, fed, row in zip(small, small_feeds, values)]
            small = [seq for seq in small if seq.finish_reason is None and seq.router.active is Role.SMALL]
            if done.query():
                t_done = time.perf_counter()  # late by at most one small step
                break
            if not small:
                break
        values = summary.tolist()  # waits for the large step if it still runs
        step_ms = self._account(Role.LARGE, nobody, groups[Role.LARGE], t0, t_done,
                                measure=not _reads_prompt(groups[Role.LARGE], feeds))
        events += [(seq, self._advance(seq, Role.LARGE, fed, row, step_ms))
                   for seq, fed, row in zip(groups[Role.LARGE], feeds, values)]
        return events

    def _fit_large(self, catch_up_tokens: int, seconds: float) -> None:
        """Add a large round to the fit of `large_costs` (the first one, which may hold a graph capture or a
        prefill, is left out, as in `_measure`). A round with catch-up also keeps the slope, if the fit has one;
        rounds without drag it toward whatever their own cost says, not what catch-up costs."""
        if self.rounds[Role.LARGE] > 1:
            x, y = float(catch_up_tokens), seconds
            self.large_fit = [0.95 * s + v for s, v in zip(self.large_fit, (1.0, x, y, x * x, x * y))]
            line = self._fitted_line() if catch_up_tokens else None
            if line is not None:
                self.catch_up_slope = line[1]

    def _fitted_line(self) -> tuple[float, float] | None:
        """(intercept, slope) of the decayed least-squares line through the large rounds, the slope within
        [0, step / 16], the intercept at least step / 4; None while the catch-ups' standard deviation is below one
        token (or fewer than 4 rounds are in)."""
        n, sx, sy, sxx, sxy = self.large_fit
        step = self.step_seconds[Role.LARGE]
        spread = n * sxx - sx * sx
        if n < 4 or spread <= 1.0 * n * n:
            return None
        slope = min(max((n * sxy - sx * sy) / spread, 0.0), step / 16)
        return max((sy - slope * sx) / n, step / 4), slope

    def large_costs(self) -> tuple[float, float]:
        """(seconds of a large round that feeds one token per row, seconds per catch-up token beyond that): a
        least-squares line through the recent large rounds (decayed). Until the rounds' catch-ups differ enough
        to fit a slope, the measured large step and the last slope fitted (before any, 1/256 of the step: a large
        model's pass costs about its weight read up to a few hundred tokens). The last slope is kept because a
        run of rounds without catch-up (a large-only spell, a workload the large model writes) decays the fit's
        spread away and says nothing about catch-up: on an H100 at batch 64, forgetting it after the 128 rounds
        of a large-only run sent the next EAD run back to small rounds that the fit had found slower (BENCHMARKS.md,
        session 7)."""
        line = self._fitted_line()
        if line is not None:
            return line
        step = self.step_seconds[Role.LARGE]
        return step, step / 256 if self.catch_up_slope is None else self.catch_up_slope

    def run_ahead_cap(self) -> int:
        """Most small steps per large step on two GPUs: as many as fit in a large step (measured step times), and
        one more for the measurements' error."""
        return math.ceil(self.step_seconds[Role.LARGE] / max(self.step_seconds[Role.SMALL], 1e-9)) + 1

    def _mark_done(self, role: Role) -> torch.cuda.Event | _Ran:
        """`_marker` for the work queued so far on `role`'s device (tests script it)."""
        return _marker(self.devices[role])

    def _launch(self, rows: list[Sequence],
                runner: NativeBatchRunner | HFBatchRunner) -> tuple[list[list[int]], Tensor]:
        """Start one group's forward pass: (the tokens fed per row, the (rows, 5) summary on the device, not yet
        read). Nothing here waits for the device, so two groups on two GPUs run at once."""
        # 1. The active model reads every token it has not seen, in one forward pass for all rows: the prompt
        #    on its first use, one token in steady state, and after a switch what the other model wrote.
        feeds = [seq.ids[runner.seen[seq.slot]:] for seq in rows]
        # 2. The routing signals on the raw logits, and 3. the tokens from each row's sampler, on the device:
        #    (n, 5) = 4 signals and the token. The native runner computes the signals and the greedy token inside
        #    its graphs; sampled rows draw here.
        slots = [seq.slot for seq in rows]
        if isinstance(runner, NativeBatchRunner):
            logits, summary = runner.feed_many(slots, feeds, with_summary=True)
            if not all(seq.sampling.greedy for seq in rows):
                summary = torch.cat([summary[:, :4], self._sample(logits, rows)[:, None].float()], dim=1)
        else:
            logits = runner.feed_many(slots, feeds)  # (n, V) float32
            tokens = self._sample(logits, rows)
            summary = torch.cat([self.token_signals(logits), tokens[:, None].float()], dim=1)
        return feeds, summary

    def _look_ahead(self, role: Role, rows: list[Sequence], summary: Tensor,
                    groups: dict[Role, list[Sequence]]) -> _Lookahead | None:
        """Launch the next round of `role` for `rows` now, before the host reads this one, feeding each row the token
        this round gives it, still on the device (`summary[:, 4]`, the greedy token); None where no lookahead runs.
        Rows this round ends for certain are left out. Sampled rows are never in one: a discarded lookahead would
        have drawn from their generators."""
        runner = self.runners[role]
        if not (self.lookahead and self.mode == "ead" and self.sync is None and not self.concurrent
                and isinstance(runner, NativeBatchRunner) and all(seq.sampling.greedy for seq in rows)):
            return None
        keep = [i for i, seq in enumerate(rows) if not self._ends_now(seq)]
        if not keep or not self._likely_run(role, [rows[i] for i in keep], groups, len(keep) < len(rows)):
            return None
        t_launch = time.perf_counter()
        _, ahead = runner.decode_from_device([rows[i].slot for i in keep], _rows_of(summary, keep)[:, 4])
        return _Lookahead(role, [rows[i] for i in keep], ahead, *_copy_to_host(ahead), t_launch)

    def _likely_run(self, role: Role, rows: list[Sequence], groups: dict[Role, list[Sequence]],
                    frees_slot: bool) -> bool:
        """Whether a round of `role` launched ahead for `rows` will likely run: a discarded one wastes a step of
        device time, where one that runs saves only the host's turn (0.15 ms a token at the 1.5B shape, 2-4 ms a
        round at batch 64). Never when a slot this round frees will admit a waiting row.

        Exact schedule: not while the other group has rows (the choice between two groups turns often: 51 large
        rounds among 174 small ones at batch 4, f = 0.26, in BENCHMARKS.md). A small round runs ahead then (EAD's
        small segments are the long ones, and its step the cheap one); a large round only if no row's router can
        switch at the next token.

        Throughput schedule: a large round is one that every row rides, and `rows` are all the running rows; the
        next round is one too for certain while a spell of the guard goes on; likely within a phase of large rounds
        (`large_phase`) if the phase outlasts half the large rows that may switch at the next token doing so (the
        rows within their dwell stay for certain; a router of the paper's rule leaves a large segment at a given
        token with a probability well under a half, and rows switch on their own); and outside a phase if the rule
        (`_throughput_rule`) still picks a large round when as many large rows as may switch, up to 2 or a tenth of
        them, have gone small. A small round runs ahead if no spell is on or may start after it, and the rule still
        picks small when as many small rows as may switch, up to 2 or a tenth of them, have gone large and the
        large group has waited two more small steps."""
        if frees_slot and self.queue:
            return False
        if self.schedule == "throughput":
            if role is Role.LARGE:
                if self.fallback_left > 0:
                    return True
                large = [seq for seq in rows if seq.router.active is Role.LARGE]
                may = sum(not _keeps_model(seq.router) for seq in large)
                if self.in_phase:
                    return len(large) - math.ceil(may / 2) >= self.large_phase[1] * len(rows)
                k = _few(may)  # large rows going small: the rule's worst case
                return self._throughput_rule(len(rows) - len(large) + k, len(large) - k, 0.0, False)[0] is Role.LARGE
            if self.fallback_left > 0 or len(self.recent) + 1 >= self.guard_rounds > 0:
                return False  # a spell of large rounds is on, or this round's verdict may start one
            k = _few(sum(not _keeps_model(seq.router) for seq in rows))  # small rows going large: the worst case
            waited = self.waited[Role.LARGE] + 2 * self.step_seconds[Role.SMALL]
            n_large = len(groups[Role.LARGE])
            return self._throughput_rule(len(rows) - k, n_large + k, waited, False)[0] is Role.SMALL
        other = Role.LARGE if role is Role.SMALL else Role.SMALL
        if groups[other]:
            return False
        return role is Role.SMALL or all(_keeps_model(seq.router) for seq in rows)

    def _ends_now(self, seq: Sequence) -> bool:
        """Whether the token in flight is `seq`'s last for certain: its max_new_tokens'th, or the context's last."""
        n = len(seq.ids) + 1
        return n - len(seq.prompt_ids) >= seq.stopper.max_new_tokens or n >= self.max_seq_tokens

    def _resume(self, roles: list[Role], rows: dict[Role, list[Sequence]]) -> _Lookahead | None:
        """The lookahead launched in the last step, if it is the round `roles` and `rows` describe: its group alone,
        and its rows, less those that finished or went to the other model since (their tokens are ignored), exactly
        that group's rows (none joined). Else it is discarded. A row of it that runs on without its token gets the
        token back out of that model's cache (`truncate`: the token is the row's own, but the cache then holds what
        it would hold without the lookahead, so catch-ups and traces stay the same). A finished row's slot needs
        nothing: it is reset on reuse."""
        ahead, self.pending = self.pending, None
        if ahead is None:
            return None
        live = [i for i, seq in enumerate(ahead.rows) if seq.finish_reason is None]
        if self.schedule == "throughput" and ahead.role is Role.LARGE:  # every row rides, whatever its mode
            keep = live
        else:
            keep = [i for i in live if ahead.rows[i].router.active is ahead.role]
        use = roles == [ahead.role] and [ahead.rows[i] for i in keep] == rows[ahead.role]
        runner = self.runners[ahead.role]
        for i in set(live) - set(keep) if use else live:
            slot = ahead.rows[i].slot
            runner.truncate(slot, runner.seen[slot] - 1)
        if not use:
            self.lookahead_discarded += 1
            return None
        self.lookahead_rounds += 1
        ahead.rows, ahead.summary, ahead.keep = [ahead.rows[i] for i in keep], _rows_of(ahead.summary, keep), keep
        return ahead

    def _account(self, role: Role, groups: dict[Role, list[Sequence]], rows: list[Sequence], t0: float,
                 t_end: float | None = None, measure: bool = True) -> float:
        """Book a round of `role` from `t0` to `t_end` (default now): step time (unless not `measure`), waits,
        counters; returns its duration in ms. A group of `groups` other than `role` with rows waited this round."""
        step_ms = ((time.perf_counter() if t_end is None else t_end) - t0) * 1e3
        if measure:
            self._measure(role, step_ms / 1e3)
        for other in Role:
            self.waited[other] = 0.0 if other is role or not groups[other] else self.waited[other] + step_ms / 1e3
        self.rounds[role] += 1
        self.rows_stepped[role] += len(rows)
        return step_ms

    def _emit(self, seq: Sequence, verdict: Verdict, step_ms: float) -> list[tuple[Sequence, StepRecord]]:
        """Add a speculation round's tokens to `seq`, one by one as if the large model had written each, until
        they run out, the sequence ends, or (hybrid) its router hands the next token to the small model; then
        roll both caches back to the kept text. `fed` of the first record is the large model's catch-up only."""
        slot, index, events = seq.slot, len(seq.generated), []
        for token, signals in zip(verdict.tokens, verdict.signals):
            fed = verdict.fed if not events else []
            events.append((seq, self._advance(seq, Role.LARGE, fed, [*signals, token], step_ms)))
            if seq.finish_reason is not None or (self.mode == "hybrid" and seq.router.active is not Role.LARGE):
                break
        seq.trace.verifications.append(VerifyEvent(index=index, drafted=len(verdict.draft),
                                                   accepted=verdict.accepted, emitted=len(events)))
        if seq.finish_reason is None:
            self.speculator.rollback(slot, verdict, len(events))
        return events

    def _sample(self, logits: Tensor, rows: list[Sequence]) -> Tensor:
        if all(seq.sampling.greedy for seq in rows):
            return logits.argmax(dim=-1)
        return torch.stack([sample_next(logits[i: i + 1], seq.sampling, seq.generator_on(logits.device))[0]
                            for i, seq in enumerate(rows)])

    def _measure(self, role: Role, seconds: float) -> None:
        if not self.measured[role]:  # the first step may include graph capture or a prefill: take it as a start
            self.measured[role] = True
            if self.measured[Role.SMALL if role is Role.LARGE else Role.LARGE]:
                self.step_seconds[role] = seconds
            else:  # keep the size ratio until the other model has a measurement too
                ratio = self.step_seconds[Role.SMALL] / self.step_seconds[Role.LARGE]
                self.step_seconds = {role: seconds,
                                     Role.SMALL if role is Role.LARGE else Role.LARGE:
                                         seconds / ratio if role is Role.SMALL else seconds * ratio}
            return
        self.step_seconds[role] = 0.9 * self.step_seconds[role] + 0.1 * seconds

    def _advance(self, seq: Sequence, role: Role, fed: list[int], row: list[float], step_ms: float) -> StepRecord:
        """Record one token of `seq`, route its next token, and finish it if it ended."""
        *values, token_id = row
        token_id = int(token_id)
        sig = TokenSignals.from_values(values)
        n_generated = len(seq.ids) - len(seq.prompt_ids)
        unseen_generated = min(len(fed), n_generated)  # the rest of `fed` is prompt
        seq.trace.prefill_tokens[role.value] += len(fed) - unseen_generated
        if n_generated > 0 and role is not seq.trace.steps[-1].role:
            seq.trace.switches.append(SwitchEvent(index=n_generated, to=role, catchup_tokens=unseen_generated))
        seq.ids.append(token_id)
        seq.router.observe(sig)
        record = StepRecord(index=n_generated, token_id=token_id, role=role, entropy_bits=sig.entropy_bits,
                            mean_bits=seq.router.last_mean_bits, fed_tokens=len(fed), step_ms=step_ms)
        seq.trace.steps.append(record)
        # Stop on an end-of-sequence id, a stop string, max_new_tokens or a full context.
        seq.finish_reason = seq.stopper.update(seq.ids, len(seq.prompt_ids))
        if seq.finish_reason is None and len(seq.ids) >= self.max_seq_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._free(seq)
        return record

    def result(self, seq: Sequence, seconds: float | None = None) -> GenerateResult:
        """The result of `seq` so far; `seconds` defaults to its time from start to finish (or to now)."""
        if seconds is None:
            start = seq.t_started if seq.t_started is not None else seq.t_added
            seconds = (seq.t_finished or time.perf_counter()) - start
        stats = summarize(seq.trace, self.pair.small.params, self.pair.large.params, seconds)
        return GenerateResult(text=seq.stopper.text, token_ids=seq.generated, prompt_token_ids=seq.prompt_ids,
                              finish_reason=seq.finish_reason or "interrupted", trace=seq.trace, stats=stats)

    def generate_many(self, prompt_ids: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None,
                      routers: list[RoutingPolicy] | None = None,
                      on_step: Callable[[Sequence, StepRecord], None] | None = None) -> list[GenerateResult]:
        """Run every prompt to the end, `max_batch` at a time; results in input order."""
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids) or (routers is not None and len(routers) != len(prompt_ids)):
            raise ConfigError("give one SamplingParams and one router per prompt, or a single SamplingParams")
        seqs = [self.add(ids, p, routers[i] if routers else None) for i, (ids, p) in enumerate(zip(prompt_ids, params))]
        try:
            while any(seq.finish_reason is None for seq in seqs):
                for seq, record in self.step():
                    if on_step is not None:
                        on_step(seq, record)
        except BaseException:
            for seq in seqs:
                self.cancel(seq)
            raise
        return [self.result(seq) for seq in seqs]


class Engine:
    """One sequence at a time: a BatchEngine with one slot, driven step by step (the CLI's streaming path)."""

    def __init__(self, pair: ModelPair, cfg: RouterConfig | None = None, engine_cfg: EngineConfig | None = None,
                 mode: str = "ead", speculative: SpeculativeConfig | None = None, schedule: str = "exact") -> None:
        self.batch = BatchEngine(pair, cfg, engine_cfg, max_batch=1, mode=mode, speculative=speculative,
                                 schedule=schedule)
        self.pair, self.cfg, self.engine_cfg = pair, self.batch.cfg, self.batch.engine_cfg
        self.backend, self.runners, self.max_seq_tokens = self.batch.backend, self.batch.runners, self.batch.max_seq_tokens

    def start(self, prompt_ids: list[int], sampling: SamplingParams,
              router: RoutingPolicy | None = None) -> Sequence:
        """Begin a sequence, dropping any unfinished one. `router` replaces the paper's rule for it."""
        for seq in list(self.batch.queue) + [s for s in self.batch.slots if s is not None]:
            self.batch.cancel(seq)
        return self.batch.add(prompt_ids, sampling, router)

    def step(self, seq: Sequence) -> list[StepRecord]:
        """Generate the next token of `seq` with the model the router chose (several tokens in a round of
        speculation), letting the router choose again after each. Returns one record per new token."""
        events = self.batch.step()
        assert all(stepped is seq for stepped, _ in events), "Engine.step was given a sequence other than the last"
        return [record for _, record in events]

    def result(self, seq: Sequence, seconds: float | None = None) -> GenerateResult:
        return self.batch.result(seq, seconds)

    def generate(self, prompt_ids: list[int], sampling: SamplingParams | None = None,
                 on_step: Callable[[Sequence, StepRecord], None] | None = None,
                 router: RoutingPolicy | None = None) -> GenerateResult:
        """Run one sequence to the end. `on_step` sees every token as it is made (streaming, progress); with
        speculation several come in one step, and `seq` already holds them all when it sees the first."""
        seq = self.start(prompt_ids, sampling or SamplingParams(), router)
        while seq.finish_reason is None:
            for record in self.step(seq):
                if on_step is not None:
                    on_step(seq, record)
        return self.result(seq)


class _Ran:
    """`_marker` on a device that runs work as it is queued (the CPU): done at once."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _copy_to_host(summary: Tensor) -> tuple[Tensor, torch.cuda.Event | _Ran]:
    """Start a summary's copy to the host: (a pinned host tensor, a marker whose `synchronize()` waits for the copy
    and the work queued before it, not for work queued after). On the CPU the summary is there already."""
    if summary.device.type != "cuda":
        return summary, _Ran()
    host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
    host.copy_(summary, non_blocking=True)
    return host, _marker(summary.device)


def _marker(device: torch.device | None) -> torch.cuda.Event | _Ran:
    """A marker whose `query()` is True, and whose `synchronize()` returns, once the work queued so far on `device`
    has run (not work queued after): a CUDA event on its current stream; elsewhere the work ran as it was queued."""
    if device is None or device.type != "cuda":
        return _Ran()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _rows_of(summary: Tensor, index: list[int]) -> Tensor:
    """Rows `index` (increasing) of a tensor on the device, without a host sync."""
    if len(index) == summary.shape[0]:
        return summary
    return summary.index_select(0, torch.tensor(index).to(summary.device, non_blocking=True))


def _keeps_model(router: RoutingPolicy) -> bool:
    """Whether `router` keeps its model at its next `observe` for certain, as far as the engine can tell: the paper's
    rule while its dwell holds, or at an infinite tau on its model's side; a script while the dwell it declares holds,
    or past its end. Other policies, and these otherwise, may switch at any token."""
    if type(router) is Router:
        tau, active = router.cfg.threshold_bits, router.active
        return (router.tokens_since_switch + 1 < router.cfg.min_dwell_tokens
                or (tau == math.inf and active is Role.SMALL) or (tau == -math.inf and active is Role.LARGE))
    if type(router) is ScriptedRouter:
        return router.n >= len(router.roles) - 1 or router.tokens_since_switch + 1 < router.min_dwell_tokens
    return False


def _reads_prompt(rows: list[Sequence], feeds: list[list[int]]) -> bool:
    """Whether a pass that feeds each row its `feeds` reads prompt tokens: a prefill, which is no measure of a
    decode round (`BatchEngine.step_seconds`) nor of catch-up (the fit of `large_costs`). Counted, the prompts of
    rows joining a running batch made the small step look 20 ms at batch 64 on an H100 (2.7 ms apart). Call it
    before the pass's tokens are appended."""
    return any(len(fed) > len(seq.ids) - len(seq.prompt_ids) for seq, fed in zip(rows, feeds))


def _few(may: int) -> int:
    """How many of `may` rows that may switch at the next token `_likely_run` reckons with: up to 2, or a tenth."""
    return min(may, max(2, math.ceil(may / 10)))


def _vocab_size(model) -> int:
    """Output width of a transformers model, of ead's decoder, or of another backend's model handle."""
    return model.args.vocab_size if hasattr(model, "args") else model.config.vocab_size


def _device(model) -> torch.device | None:
    """The device of a transformers model or of ead's decoder; None for a handle without torch weights."""
    if hasattr(model, "tok_embeddings"):
        return model.tok_embeddings.weight.device
    return getattr(model, "device", None)


def generate(pair: ModelPair, prompts: Prompt | list[Prompt], config: RouterConfig | None = None,
             sampling: SamplingParams | list[SamplingParams] | None = None, engine_config: EngineConfig | None = None,
             max_batch: int = 16, routers: list[RoutingPolicy] | None = None, mode: str = "ead",
             speculative: SpeculativeConfig | None = None, schedule: str = "exact") -> list[GenerateResult]:
    """EAD on each input: a plain prompt (str) or chat messages (list of {'role', 'content'} dicts), or a list
    of those, run `max_batch` at a time, each routed on its own. Returns one GenerateResult per input, in order.
    With greedy decoding (or a seed per request) and `schedule` "exact" each output is the one that input gets
    alone; "throughput" trades that for speed (BatchEngine). `mode` "speculative" or "hybrid" (drafting set by
    `speculative`) is described in the module docstring."""
    batch = [prompts] if isinstance(prompts, str) or _is_messages(prompts) else list(prompts)
    engine = BatchEngine(pair, config, engine_config, max_batch=max(1, min(max_batch, len(batch))), mode=mode,
                         speculative=speculative, schedule=schedule)
    return engine.generate_many([pair.encode(p) for p in batch], sampling, routers)


def _is_messages(x: object) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], dict)
