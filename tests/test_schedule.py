"""BatchEngine's schedules against independent references: the throughput schedule's tokens against transformers
run on each row's own prefix, its round choice against the rule worked out by hand from the group sizes and a
scripted cost model; the run-ahead of two GPUs against each row run alone, with a scripted end of the large step.

Costs are scripted by fixing `step_seconds` and switching off its measurement, so the choices do not depend on
this machine's timing.
"""

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ead
from ead.bench import roles_for_share
from ead.config import EngineConfig, Role, RouterConfig
from ead.engine import SMALL_ROUND_MARGIN, BatchEngine, Engine
from ead.errors import ConfigError
from ead.router import ScriptedRouter, entropy_bits
from ead.sampling import SamplingParams

from conftest import gsm8k_questions, scripted_costs, switching_config

S, L = Role.SMALL, Role.LARGE
TOKENS = 24
PARAMS = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg(pair, prompts):
    return switching_config(pair, prompts[0], PARAMS)


@torch.no_grad()
def next_token(model, ids: list[int]) -> tuple[int, float]:
    """Greedy token and entropy in bits of transformers' model on the whole prefix, without a cache."""
    logits = model(torch.tensor([ids])).logits[0, -1]
    return int(logits.argmax()), float(entropy_bits(logits))


# --- the throughput schedule ---

@pytest.mark.parametrize("backend", ["hf", "native"])
def test_every_token_is_its_writers_greedy_token_and_the_router_reads_the_writer(pair, prompts, cfg, backend):
    """Large rounds carry the rows in small mode (small steps cheap but not free, so both kinds of round run):
    every token, ride-along ones included, is the greedy token of the model its record names, on the row's own
    prefix; the entropy the router read is that model's, and the rolling mean covers the last w tokens whoever
    wrote them."""
    engine = scripted_costs(BatchEngine(pair, cfg, EngineConfig(backend=backend), max_batch=4,
                                        schedule="throughput"), 1.0, 2.0)
    results = engine.generate_many(prompts, PARAMS)
    assert engine.ride_along_tokens > 0 and engine.rounds[S] > 0 and engine.rounds[L] > 0
    models = {S: pair.small.model, L: pair.large.model}
    for b, (prompt, res) in enumerate(zip(prompts, results)):
        ids, bits = list(prompt), []
        for i, step in enumerate(res.trace.steps):
            token, h = next_token(models[step.role], ids)
            assert step.token_id == token, f"row {b} token {i} ({step.role.value}): {step.token_id} != {token}"
            assert abs(step.entropy_bits - h) < 1e-3, f"row {b} token {i}: entropy {step.entropy_bits} != {h}"
            bits.append(step.entropy_bits)
            assert step.mean_bits == pytest.approx(np.mean(bits[-cfg.window_tokens:]), abs=1e-9)
            ids.append(token)
    assert sum(r.stats.tokens_large for r in results) > 0 and sum(r.stats.tokens_small for r in results) > 0


def test_throughput_keeps_every_routed_large_token_and_adds_ride_alongs(pair, prompts):
    """The same scripted routes under both schedules: exact writes exactly the routed roles; throughput writes
    a large token wherever the route says large, and more (its ride-alongs), so its large share is higher."""
    scripts = [roles_for_share(TOKENS, 0.3, seed=i) for i in range(len(prompts))]
    shares, roles = {}, {}
    for schedule in ("exact", "throughput"):
        engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="native"), max_batch=4,
                                            schedule=schedule), 1.0, 2.0)
        results = engine.generate_many(prompts, PARAMS, routers=[ScriptedRouter(s) for s in scripts])
        roles[schedule] = [[s.role for s in r.trace.steps] for r in results]
        shares[schedule] = sum(r.stats.tokens_large for r in results) / sum(len(r.token_ids) for r in results)
        ride_alongs = sum(got is L and routed is S for row, script in zip(roles[schedule], scripts)
                          for got, routed in zip(row, script))
        assert ride_alongs == engine.ride_along_tokens
    assert roles["exact"] == [s[:TOKENS] for s in scripts]
    for got, script in zip(roles["throughput"], scripts):
        assert all(g is L for g, routed in zip(got, script) if routed is L)
    assert shares["throughput"] > shares["exact"] > 0


@pytest.mark.parametrize("small_s, large_s, per_token", [(1.0, 3.0, 0.0), (1.0, 2.0, 0.0), (1.0, 4.0, 0.3)])
def test_the_round_is_the_one_with_more_rows_per_second(pair, prompts, small_s, large_s, per_token):
    """Without phases of large rounds, with scripted costs and no wait bound, each round is small iff
    n_small / (T_small + c * n_small) > 1.25 n_all / T_large (c: the large model's cost of catching up a token
    later; 1.25: SMALL_ROUND_MARGIN); a small round steps exactly the rows in small mode, a large round every
    running row. (1.0, 2.0, 0.0): 3 small rows of 4 step (3 > 2.5), 2 do not (2 < 2.5)."""
    assert SMALL_ROUND_MARGIN == 1.25
    engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=4,
                                        max_wait_steps=1e9, schedule="throughput", large_phase=None),
                            small_s, large_s, per_token)
    scripts = [[S] * 40, [L] * 40, [S] * 3 + [L] * 6 + [S] * 30, [L] * 2 + [S] * 40]
    seqs = [engine.add(p, PARAMS, ScriptedRouter(r)) for p, r in zip(prompts, scripts)]
    seen = set()
    while engine.has_work:
        modes = {seq: seq.router.active for seq in seqs if seq.finish_reason is None}
        n_small = sum(mode is S for mode in modes.values())
        expected = S if n_small / (small_s + per_token * n_small) > 1.25 * len(modes) / large_s else L
        seen.add(expected)
        events = engine.step()
        assert {record.role for _, record in events} == {expected}, f"groups {n_small}/{len(modes)}"
        assert sorted(id(seq) for seq, _ in events) == sorted(id(seq) for seq, m in modes.items()
                                                              if expected is L or m is S)
    assert seen == {S, L}


def test_large_costs_fit_the_line_of_the_large_rounds_times_against_their_catch_up(pair):
    """Rounds timed as 10 ms + 0.2 ms per catch-up token: the fit finds both; before the catch-ups vary, the
    measured step and 1/256 of it per token."""
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=4, schedule="throughput")
    engine.step_seconds[L] = 0.012
    assert engine.large_costs() == (0.012, 0.012 / 256)
    engine.rounds[L] = 2  # past the first round, which the fit leaves out
    for x in [0, 3, 1, 7, 2, 0, 5, 4] * 3:
        engine._fit_large(x, 0.010 + 0.0002 * x)
    t_large, per_token = engine.large_costs()
    assert t_large == pytest.approx(0.010, rel=1e-6) and per_token == pytest.approx(0.0002, rel=1e-6)
    for x in [0, 3, 1, 7]:  # a slope above step / 16 is cut there
        engine._fit_large(x, 0.010 + 0.01 * x)
    assert engine.large_costs()[1] == pytest.approx(engine.step_seconds[L] / 16)


def test_large_costs_keep_the_last_slope_through_rounds_without_catch_up(pair):
    """200 rounds without catch-up decay the fit's spread away: the step comes back, the slope fitted before
    stays (not 1/256 of the step)."""
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=4, schedule="throughput")
    engine.step_seconds[L] = 0.012
    engine.rounds[L] = 2
    for x in [0, 3, 1, 7, 2, 0, 5, 4] * 3:
        engine._fit_large(x, 0.010 + 0.0002 * x)
    for _ in range(200):
        engine._fit_large(0, 0.011)
    assert engine.large_costs() == (0.012, pytest.approx(0.0002, rel=1e-6))


def test_rounds_that_read_prompts_measure_no_step_and_fit_no_catch_up(pair, prompts):
    """The clock says 50 ms for a round that reads a prompt and 2 / 10 ms for a small / large decode round: the
    step times and the fit hold the decode rounds' alone (a third row joins mid-run, as on a server), though
    every round, prefill or not, is booked."""
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=3, max_wait_steps=1)
    real = engine._account

    def clocked(role, groups, rows, t0, t_end=None, measure=True):
        t_end = t0 + (0.050 if not measure else 0.002 if role is S else 0.010)
        return real(role, groups, rows, t0, t_end, measure)

    engine._account = clocked
    scripts = [[S] * 3 + [L] * 30, [S] * 30, [L] * 40]
    for prompt, script in zip(prompts[:2], scripts):
        engine.add(prompt, PARAMS, ScriptedRouter(script))
    for _ in range(12):
        engine.step()
    engine.add(prompts[2], PARAMS, ScriptedRouter(scripts[2]))
    for _ in range(12):
        engine.step()
    assert engine.rounds[S] > 1 and engine.rounds[L] > 2
    assert engine.step_seconds == {S: pytest.approx(0.002), L: pytest.approx(0.010)}
    assert engine.large_costs() == (pytest.approx(0.010), pytest.approx(0.010 / 256))


@pytest.mark.parametrize("max_wait_steps", [0.0, 1e9])
def test_large_rows_wait_no_longer_than_the_bound(pair, prompts, max_wait_steps):
    """Small steps so cheap that the rule always prefers them while a row is in small mode (no phases of large
    rounds): only the bound brings the large rows' turn. With no wait allowed they never wait two rounds;
    unbounded, they wait until the small rows are done."""
    engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=3,
                                        max_wait_steps=max_wait_steps, schedule="throughput", large_phase=None),
                            1.0, 100.0)
    scripts = [[L] * 40, [S] * 40, [S] * 5 + [L] * 40]
    seqs = [engine.add(p, PARAMS, ScriptedRouter(r)) for p, r in zip(prompts, scripts)]
    waits, longest = {seq: 0 for seq in seqs}, 0
    while engine.has_work:
        large = [seq for seq in seqs if seq.finish_reason is None and seq.router.active is L]
        stepped = {seq for seq, record in engine.step() if record.role is L}
        for seq in large:
            waits[seq] = 0 if seq in stepped else waits[seq] + 1
            longest = max(longest, waits[seq])
    if max_wait_steps == 0:
        assert longest == 1
    else:
        assert longest >= TOKENS - 1  # the always-small row ran to its end first


def test_bad_schedules_are_config_errors(pair):
    with pytest.raises(ConfigError, match="schedule must be one of exact, throughput, got 'fast'"):
        BatchEngine(pair, schedule="fast")
    with pytest.raises(ConfigError, match="schedule 'throughput' applies to mode 'ead' only"):
        BatchEngine(pair, mode="speculative", schedule="throughput")


def test_ead_generate_takes_the_schedule(pair, prompts, cfg):
    texts = [pair.decode(p) for p in prompts[:3]]
    exact = ead.generate(pair, texts, cfg, PARAMS, max_batch=3)
    alone = [Engine(pair, cfg).generate(pair.encode(t), PARAMS) for t in texts]
    assert [r.token_ids for r in exact] == [a.token_ids for a in alone]
    fast = ead.generate(pair, texts, cfg, PARAMS, max_batch=3, schedule="throughput")
    assert len(fast) == 3 and all(len(r.token_ids) == TOKENS for r in fast)


# --- with a sync (tensor parallelism): rank 0 chooses the round ---

def run_sync_rank(rank: int, world: int, port: int, folders: tuple[str, str], out: str) -> None:
    """Each rank with its own scripted costs, which alone would make it choose other rounds than rank 0 (a rank's
    clock is its own): the sync must make rank 0's choice everyone's."""
    from ead.models.tensor_parallel import broadcast_from_first, init_rank

    torch.set_num_threads(1)
    init_rank(rank, world, port, backend="gloo")
    pair = ead.load_pair(*folders, device="cpu")
    prompts = [pair.encode(q[: 40 + 37 * i]) for i, q in enumerate(gsm8k_questions(3))]
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend="native", cuda_graphs=False), max_batch=3,
                         max_wait_steps=1e9, sync=broadcast_from_first, schedule="throughput")
    scripted_costs(engine, 1.0, 3.0 if rank == 0 else 1.01)
    scripts = [roles_for_share(TOKENS, 0.4, seed=i) for i in range(3)]
    results = engine.generate_many(prompts, PARAMS, routers=[ScriptedRouter(s) for s in scripts])
    torch.save([(r.token_ids, [s.role.value for s in r.trace.steps]) for r in results], Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_follow_rank_zeros_round_choice(tiny_pairs, tmp_path):
    folders = tiny_pairs["qwen2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_sync_rank, args=(2, port, folders, str(tmp_path)), nprocs=2, join=True)
    pair = ead.load_pair(*folders, device="cpu")
    prompts = [pair.encode(q[: 40 + 37 * i]) for i, q in enumerate(gsm8k_questions(3))]
    engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="native", cuda_graphs=False),
                                        max_batch=3, max_wait_steps=1e9, schedule="throughput"), 1.0, 3.0)
    scripts = [roles_for_share(TOKENS, 0.4, seed=i) for i in range(3)]
    results = engine.generate_many(prompts, PARAMS, routers=[ScriptedRouter(s) for s in scripts])
    expected = [(r.token_ids, [s.role.value for s in r.trace.steps]) for r in results]
    assert engine.ride_along_tokens > 0
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected, f"rank {rank} stepped other rounds"


# --- two GPUs: the small group runs ahead ---

class ScriptedEvent:
    """A stand-in for the CUDA event after the large step: done at the `done_at`-th query (never if None)."""

    def __init__(self, done_at: int | None) -> None:
        self.done_at, self.queries = done_at, 0

    def query(self) -> bool:
        self.queries += 1
        return self.done_at is not None and self.queries >= self.done_at


def run_ahead_engine(pair, cfg, done_at: int | None, backend: str = "hf") -> BatchEngine:
    """A BatchEngine that takes its two models for two GPUs (`concurrent`, set by hand: on the CPU both share one
    device), with a large step 2.5 small steps long (cap 4) that ends at the `done_at`-th query."""
    engine = scripted_costs(BatchEngine(pair, cfg, EngineConfig(backend=backend), max_batch=3), 1.0, 2.5)
    assert not engine.concurrent
    engine.concurrent = True
    engine._mark_done = lambda role: ScriptedEvent(done_at)
    return engine


@pytest.mark.parametrize("done_at", [1, 2, None])
def test_the_small_group_steps_until_the_large_step_is_done_at_most_the_cap(pair, prompts, done_at):
    """Rows in fixed modes: each round has one large step and min(done_at, cap) small steps while the small
    group keeps rows; every row writes what it writes alone, in its scripted roles."""
    engine = run_ahead_engine(pair, RouterConfig(), done_at)
    assert engine.run_ahead_cap() == 4  # ceil(2.5 / 1) + 1
    scripts = [[L] * 40, [S] * 40, [S] * 3 + [L] * 8 + [S] * 40]
    seqs = [engine.add(p, PARAMS, ScriptedRouter(r)) for p, r in zip(prompts, scripts)]
    small_steps = []
    while engine.has_work:
        rounds, rows = dict(engine.rounds), dict(engine.rows_stepped)
        both = {seq.router.active for seq in seqs if seq.finish_reason is None} == {S, L}
        events = engine.step()
        steps = engine.rounds[S] - rounds[S]
        assert engine.rows_stepped[S] - rows[S] == sum(record.role is S for _, record in events)
        if both:
            assert engine.rounds[L] - rounds[L] == 1 and 1 <= steps <= engine.run_ahead_cap()
            small_steps.append(steps)
        for seq in {seq for seq, _ in events}:  # a row is in one group for a whole round
            assert len({record.role for s, record in events if s is seq}) == 1
    assert max(small_steps) == (4 if done_at is None else done_at)
    for seq, script, prompt in zip(seqs, scripts, prompts):
        alone = Engine(pair, RouterConfig()).generate(prompt, PARAMS, router=ScriptedRouter(script))
        assert seq.generated == alone.token_ids
        assert [s.role for s in seq.trace.steps] == script[:TOKENS]
        assert [s.index for s in seq.trace.steps] == list(range(TOKENS))


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_run_ahead_rows_write_what_they_write_alone(pair, prompts, cfg, backend):
    """The paper's rule on real entropies, rows switching at their own tokens, the large step never done before
    the cap: running ahead changes when a row's tokens come, not which."""
    engine = run_ahead_engine(pair, cfg, None, backend)
    together = engine.generate_many(prompts, PARAMS)
    assert engine.rounds[S] > engine.rounds[L] > 0
    for i, (prompt, res) in enumerate(zip(prompts, together)):
        alone = Engine(pair, cfg, EngineConfig(backend="hf")).generate(prompt, PARAMS)
        assert res.token_ids == alone.token_ids, f"row {i} differs from its run alone"
        assert [s.role for s in res.trace.steps] == [s.role for s in alone.trace.steps], f"row {i}: roles differ"
    assert any(r.stats.switches >= 2 for r in together)


# --- the throughput schedule's guard ---

def test_guard_verdicts_against_large_only_by_the_clock(pair):
    """Tries of 4 EAD rounds judged by hand against large-only decoding: 4 running rows at T_large = 2 s (the fit,
    before any spell) write 2 tokens/s, so a try at 2 tokens/s passes and one at 1 token/s starts a spell of
    large rounds, each longer than the last; a spell's rounds (its first left out) then set T_large."""
    engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=4,
                                        schedule="throughput", guard_rounds=4), 1.0, 2.0)
    for _ in range(4):
        engine._guard(2, 1.0, 4)  # 8 tokens in 4 s: as fast as large-only
    assert engine.fallback_left == 0 and engine.fallback_len == 4
    for _ in range(4):
        engine._guard(1, 1.0, 4)  # 4 tokens in 4 s: half
    assert engine.fallback_left == 4 and engine.fallback_len == 8
    groups = {S: ["a", "b", "c"], L: ["d"]}  # the rule would pick small (3 / 1.0 > 4 / 2.0)
    for seconds in (9.0, 1.0, 1.0, 1.0):  # the spell; its first round holds the riders' catch-up
        assert engine._choose_group(groups) is L
        engine._guard(4, seconds, 4)
    assert engine._choose_group(groups) is S and engine.fallback_rounds == 4
    engine.forced = False
    for _ in range(4):  # measured T_large = 1 s: large-only writes 4 tokens/s; 3 tokens/s fails
        engine._guard(3, 1.0, 4)
    assert engine.fallback_left == 8 and engine.fallback_len == 16
    engine.reset_guard()
    assert (engine.fallback_left, engine.fallback_len, engine.recent) == (0, 4, [])


def test_a_spell_ends_when_the_batch_halves_or_doubles(pair):
    """A try over 4 running rows loses: its spell holds while 2 to 8 rows run, and ends as soon as 1 does, with
    the next spell one try long again; a spell learnt at 2 rows ends when 5 run."""
    engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=8,
                                        schedule="throughput", guard_rounds=4), 1.0, 2.0)
    for _ in range(4):
        engine._guard(1, 1.0, 4)  # 4 tokens in 4 s against 4 rows / 2 s: lost
    assert (engine.fallback_left, engine.fallback_len) == (4, 8)
    assert engine._choose_group({S: ["a"], L: ["b"]}) is L  # 2 rows: the spell holds
    assert engine._choose_group({S: ["a"] * 7, L: ["b"]}) is L  # 8 rows: still
    assert engine._choose_group({S: ["a"], L: []}) is S  # 1 row: the rule's choice
    assert (engine.fallback_left, engine.fallback_len, engine.fallback_rounds) == (0, 4, 2)
    for _ in range(4):
        engine._guard(1, 2.0, 2)  # 4 tokens in 8 s against 2 rows / 2 s: lost
    assert engine.fallback_left == 4 and engine.spell_rows == 2
    assert engine._choose_group({S: ["a"] * 4, L: ["b"]}) is S and engine.fallback_left == 0


def test_guard_turns_slow_ead_rounds_into_large_rounds_that_every_row_rides(pair, prompts):
    """Scripted costs that make the rule choose small rounds, and a clock (the guard's seconds) that says every
    round takes as long as a large one: the first 3 EAD rounds fail the guard, the next 3 rounds are large and
    give every running row a token, then EAD rounds are tried again; with the guard off, no such spell."""
    scripts = [[S] * 40, [S] * 40, [S] * 12 + [L] * 40, [L] * 40]
    spells = {}
    for guard in (3, 0):
        engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=4,
                                            max_wait_steps=1e9, schedule="throughput", guard_rounds=guard),
                                1.0, 2.0)
        judged = engine._guard
        engine._guard = lambda tokens, seconds, running: judged(tokens, 2.0, running)
        seqs = [engine.add(p, PARAMS, ScriptedRouter(r)) for p, r in zip(prompts, scripts)]
        rounds = []
        while engine.has_work:
            running = [seq for seq in seqs if seq.finish_reason is None]
            events = engine.step()
            rounds.append(({record.role for _, record in events}, len(events), len(running)))
        spells[guard] = engine.fallback_rounds
        if guard:
            assert [r[0] for r in rounds[:3]] == [{S}] * 3  # 3 rows of 4 in small mode: the rule picks small
            assert rounds[3:6] == [({L}, 4, 4)] * 3  # 9 tokens in 6 s < 4 rows / 2 s: a spell, all rows ride
            assert rounds[6][0] == {S}  # EAD again
    assert spells[0] == 0 and spells[3] >= 3


# --- phases of large rounds ---

def test_a_phase_of_large_rounds_runs_from_high_to_low(pair, prompts):
    """large_phase (0.5, 0.25) over 4 rows, with costs that make the rule alone always pick small rounds while a
    row is in small mode: once 2 of the 4 running rows are in large mode, large rounds that every row rides go on
    until fewer than 1 is; then the rule again. Checked round by round from the group sizes."""
    engine = scripted_costs(BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=4,
                                        max_wait_steps=1e9, schedule="throughput", guard_rounds=0,
                                        large_phase=(0.5, 0.25)), 1.0, 100.0)
    scripts = [[S] * 40, [S] * 3 + [L] * 4 + [S] * 40, [S] * 5 + [L] * 12 + [S] * 40, [S] * 40]
    seqs = [engine.add(p, PARAMS, ScriptedRouter(r)) for p, r in zip(prompts, scripts)]
    phase, seen = False, []
    while engine.has_work:
        running = [seq for seq in seqs if seq.finish_reason is None]
        n_large = sum(seq.router.active is L for seq in running)
        if n_large >= 0.5 * len(running):
            phase = True
        elif n_large < 0.25 * len(running):
            phase = False
        expected = L if phase or n_large == len(running) else S
        events = engine.step()
        assert {record.role for _, record in events} == {expected}, f"{n_large} of {len(running)} in large mode"
        assert len(events) == (len(running) if expected is L else len(running) - n_large)
        seen.append(expected)
    assert L in seen and seen.count(L) < len(seen) // 2  # phases came, and ended
    with pytest.raises(ConfigError, match=r"large_phase must be \(high, low\) with 0 <= low <= high <= 1"):
        BatchEngine(pair, schedule="throughput", large_phase=(0.2, 0.5))
