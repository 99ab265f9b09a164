"""The engine's lookahead (a group's next round launched before the host reads the current one, fed its tokens on
the device) against the engine without it, and against transformers on each row's own prefix.

On the CPU the engine leaves the lookahead off (work runs as it is queued, so nothing would overlap); these tests
switch it on by hand, as tests/test_batch.py does `concurrent`, so that every path of it runs eagerly: rounds run as
launched, rounds discarded when a row switches, joins, finishes or is cancelled. Each run must write the same
tokens with the same trace (roles, signals, switches, catch-up counts, tokens fed) as with the lookahead off.
"""

import math

import pytest
import torch

from ead.bench import entropy_stream, paper_roles, roles_for_share
from ead.config import EngineConfig, Role, RouterConfig
from ead.engine import BatchEngine, Engine, _keeps_model
from ead.errors import CacheCapacityError, ConfigError
from ead.router import Router, ScriptedRouter, entropy_bits
from ead.runner import NativeBatchRunner
from ead.sampling import SamplingParams

from conftest import scripted_costs, switching_config

S, L = Role.SMALL, Role.LARGE
NATIVE = EngineConfig(backend="native")
PARAMS = SamplingParams(max_new_tokens=40, ignore_eos=True)
MAX_REL_ERR = 1e-4  # float32, as in models/test_transformer.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg(pair, prompts):
    return switching_config(pair, prompts[0], PARAMS)


def engine_with(pair, cfg, lookahead: bool, max_batch: int = 1, engine_cfg: EngineConfig = NATIVE) -> BatchEngine:
    # No group goes next for having waited: that bound is in measured seconds, so the rounds of two runs would
    # depend on this machine's timing, and rows sharing other rounds may differ in the last float32 bits.
    engine = BatchEngine(pair, cfg, engine_cfg, max_batch=max_batch, max_wait_steps=1e9)
    assert not engine.lookahead, "on the CPU the engine leaves the lookahead off"
    engine.lookahead = lookahead
    return engine


def run(pair, cfg, prompts, params, lookahead: bool, max_batch: int = 1, scripts=None, engine_cfg=NATIVE):
    """(engine, results) of one generate_many, the lookahead on or off; `scripts`: roles per row (ScriptedRouter)."""
    engine = engine_with(pair, cfg, lookahead, max_batch, engine_cfg)
    routers = [ScriptedRouter(s) for s in scripts] if scripts else None
    results = engine.generate_many(prompts, params, routers)
    assert engine.running == 0 and not engine.has_work and engine.step() == [] and engine.pending is None
    return engine, results


def close(a: float, b: float, exact: bool) -> bool:
    """Equal, or within 1e-6 relative (a few float32 ulps) unless `exact`: in a batch, a round run ahead for rows of
    which some then dropped out may be a pass over a larger batch bucket than the round without them, and round
    differently, as any other company of rows may. At batch 1 a round ahead is the very pass it stands for."""
    return (math.isnan(a) and math.isnan(b)) or a == b or (not exact and abs(a - b) <= 1e-6 * max(1.0, abs(b)))


def assert_same(ours, ref, what: str, exact: bool = False) -> None:
    """Same tokens, finish reason and trace: each record's id, role, tokens fed, entropy and mean (`close`), every
    switch with its catch-up count, the prompt tokens each model read. Names the first difference."""
    first = next((i for i, (a, b) in enumerate(zip(ours.token_ids, ref.token_ids)) if a != b), None)
    assert ours.token_ids == ref.token_ids, f"{what}: first differing token at index {first}"
    assert ours.finish_reason == ref.finish_reason, what
    for a, b in zip(ours.trace.steps, ref.trace.steps):
        assert (a.index, a.token_id, a.role, a.fed_tokens) == (b.index, b.token_id, b.role, b.fed_tokens), \
            f"{what}: token {b.index}: {a} != {b}"
        assert close(a.entropy_bits, b.entropy_bits, exact), f"{what}: entropy of token {b.index}: {a} != {b}"
        assert close(a.mean_bits, b.mean_bits, exact), f"{what}: mean of token {b.index}: {a} != {b}"
        assert a.step_ms > 0
    assert ours.trace.switches == ref.trace.switches, f"{what}: switches differ"
    assert ours.trace.prefill_tokens == ref.trace.prefill_tokens, what


@pytest.fixture
def every_round_ahead(monkeypatch):
    """Every round runs ahead where it can, whatever the routers may do and whatever the other group holds (the
    engine's rule, `_likely_run`, keeps those back): the most discarded rounds, the large model's cache rolled back
    too."""
    monkeypatch.setattr(BatchEngine, "_likely_run", lambda self, role, rows, groups, frees_slot: True)


@torch.no_grad()
def next_token(model, ids: list[int]) -> tuple[int, float]:
    """Greedy token and entropy in bits of transformers' model on the whole prefix, without a cache."""
    logits = model(torch.tensor([ids])).logits[0, -1]
    return int(logits.argmax()), float(entropy_bits(logits))


# --- batch 1 ---

SCRIPT = [S] * 5 + [L] * 7 + [S] * 4 + [L] * 3 + [S] * 9 + [L] * 12


@pytest.mark.parametrize("forced", [False, True])
def test_scripted_switches_at_batch_1_write_what_they_write_without_lookahead(pair, prompts, forced, request):
    """Switches at known tokens both ways: the small rounds run ahead, and each switch to the large model discards
    the small round launched ahead (forced: the large rounds run ahead too, and each switch back discards one)."""
    if forced:
        request.getfixturevalue("every_round_ahead")
    _, [off] = run(pair, RouterConfig(), prompts[1:2], PARAMS, False, scripts=[SCRIPT])
    engine, [on] = run(pair, RouterConfig(), prompts[1:2], PARAMS, True, scripts=[SCRIPT])
    assert_same(on, off, "lookahead", exact=True)
    assert [s.role for s in on.trace.steps] == SCRIPT[:40] and on.stats.switches == 5
    # Every small round but the first of each of the 3 small segments ran ahead (18 - 3), and each switch to the
    # large model discarded one. Forced, every round but the first and the 5 after a switch, each switch discarding.
    assert engine.lookahead_discarded == (5 if forced else 3)
    assert engine.lookahead_rounds == (40 - 1 - 5 if forced else 18 - 3)


@pytest.mark.parametrize("forced", [False, True])
def test_the_entropy_router_at_batch_1_writes_each_models_greedy_token_on_its_prefix(pair, prompts, cfg, forced,
                                                                                      request):
    """The paper's rule on real entropies: the same trace as without lookahead, and every token is the greedy token
    of the model its record names on the row's whole prefix (transformers, no cache), with that model's entropy."""
    if forced:
        request.getfixturevalue("every_round_ahead")
    _, [off] = run(pair, cfg, prompts[:1], PARAMS, False)
    engine, [on] = run(pair, cfg, prompts[:1], PARAMS, True)
    assert_same(on, off, "lookahead", exact=True)
    assert on.stats.switches >= 4 and engine.lookahead_rounds > 0 and engine.lookahead_discarded > 0
    models = {S: pair.small.model, L: pair.large.model}
    for step in on.trace.steps:
        token, bits = next_token(models[step.role], prompts[0] + on.token_ids[: step.index])
        assert step.token_id == token, f"token {step.index} by {step.role.value}"
        assert abs(step.entropy_bits - bits) < 1e-4, f"entropy of token {step.index}"


@pytest.mark.parametrize("max_batch", [1, 3])
@pytest.mark.parametrize("only", [S, L])
def test_one_model_alone_runs_every_round_ahead_and_wastes_none(pair, prompts, only, max_batch):
    """Small-only (tau = +inf) and large-only (tau = -inf): every round after the prompt's runs ahead, none is
    discarded (rows end at max_new_tokens, which the engine sees coming), and the tokens are transformers' greedy
    ones on each prefix."""
    cfg = RouterConfig(threshold_bits=math.inf) if only is S else \
        RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=L)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    _, off = run(pair, cfg, prompts[:3], params, False, max_batch)
    engine, on = run(pair, cfg, prompts[:3], params, True, max_batch)
    for i, (a, b) in enumerate(zip(on, off)):
        assert_same(a, b, f"row {i}", exact=True)  # no row drops out of a round ahead
        assert {s.role for s in a.trace.steps} == {only}
    assert engine.lookahead_discarded == 0
    if max_batch == 1:  # each row: a prompt round, then 11 rounds run ahead
        assert engine.lookahead_rounds == 3 * 11
    else:  # rows of different prompt lengths join at the first round and end together
        assert engine.lookahead_rounds == 11
    model = pair.small.model if only is S else pair.large.model
    for prompt, res in zip(prompts, on):
        assert res.token_ids == [next_token(model, prompt + res.token_ids[:i])[0] for i in range(12)]


# --- batches ---

def stop_in(pair, cfg, prompt: list[int], index: int) -> SamplingParams:
    """40 tokens or a stop string (an end the engine cannot see coming): the text of tokens index..index+1 of
    what the row writes without one."""
    free = Engine(pair, cfg).generate(prompt, PARAMS)
    stop = pair.decode(free.token_ids[index: index + 2])
    assert stop.strip()
    return SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop,))


@pytest.fixture(scope="module")
def batch_params(pair, prompts, cfg):
    """Per row: different max_new_tokens, and one row ending at a stop string."""
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (40, 17, 31, 40, 9)]
    params[3] = stop_in(pair, cfg, prompts[3], 20)
    return params


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("max_batch", [2, 4])
def test_rows_of_different_lengths_switching_at_their_own_tokens(pair, prompts, cfg, batch_params, max_batch,
                                                                  forced, request, monkeypatch):
    """Five rows (so some wait for a slot and join later), ending at different tokens, one at a stop string, each
    switching at its own tokens: rows leave a group while the rest of it runs on ahead; forced, rounds also run
    ahead beside the other group's rows, so rows join and groups alternate with a round ahead pending. Each row
    writes the same tokens and trace as without the lookahead, and as alone (transformers backend)."""
    if forced:
        request.getfixturevalue("every_round_ahead")
    partial = []  # rounds ahead that ran for part of the rows they were launched for (the others left the group)
    resume = BatchEngine._resume

    def spy(self, roles, rows):
        launched_for = len(self.pending.rows) if self.pending is not None else 0
        ahead = resume(self, roles, rows)
        partial.append(ahead is not None and len(ahead.rows) < launched_for)
        return ahead

    monkeypatch.setattr(BatchEngine, "_resume", spy)
    _, off = run(pair, cfg, prompts, batch_params, False, max_batch)
    engine, on = run(pair, cfg, prompts, batch_params, True, max_batch)
    for i, (a, b) in enumerate(zip(on, off)):
        assert_same(a, b, f"row {i}")
        alone = Engine(pair, cfg, EngineConfig(backend="hf")).generate(prompts[i], batch_params[i])
        assert a.token_ids == alone.token_ids, f"row {i} differs from its run alone"
    assert [r.finish_reason for r in on] == ["length", "length", "length", "stop", "length"]
    assert len({len(r.token_ids) for r in on}) >= 4 and all(r.stats.switches >= 2 for r in on)
    assert engine.lookahead_rounds > 0 and engine.lookahead_discarded > 0 and any(partial)


def test_rows_ending_at_the_context_are_left_out_of_the_round_ahead(pair, prompts):
    """A row that reaches max_seq_tokens ends for certain, like one at max_new_tokens: no round ahead is wasted."""
    cfg, params = RouterConfig(threshold_bits=math.inf), SamplingParams(max_new_tokens=30, ignore_eos=True)
    engine_cfg = EngineConfig(backend="native", max_seq_tokens=len(prompts[2]) + 6)
    _, off = run(pair, cfg, prompts[:3], params, False, 3, engine_cfg=engine_cfg)
    engine, on = run(pair, cfg, prompts[:3], params, True, 3, engine_cfg=engine_cfg)
    for i, (a, b) in enumerate(zip(on, off)):
        assert_same(a, b, f"row {i}")
    assert len(on[2].token_ids) == 6 and engine.lookahead_rounds > 0 and engine.lookahead_discarded == 0


def test_cancelling_rows_of_a_round_ahead(pair, prompts):
    """Cancel a row while a round ahead holds it; add a row that takes its slot; cancel another: nothing breaks, the
    other rows write what they write without lookahead, and a cancelled row keeps the tokens it had."""
    cfg, params = RouterConfig(threshold_bits=math.inf), SamplingParams(max_new_tokens=20, ignore_eos=True)
    _, off = run(pair, cfg, prompts[:4], params, False, 3)
    engine = engine_with(pair, cfg, True, 3)
    a, b, c = (engine.add(p, params) for p in prompts[:3])
    for _ in range(5):
        engine.step()
    assert engine.pending is not None and engine.pending.rows == [a, b, c]
    engine.cancel(b)  # no row waits for its slot: the round ahead runs on for a and c
    rounds, discarded = engine.lookahead_rounds, engine.lookahead_discarded
    assert [seq for seq, _ in engine.step()] == [a, c] and engine.lookahead_rounds == rounds + 1
    d = engine.add(prompts[3], params)  # it takes b's slot at the next step: the round ahead of a and c is discarded
    assert [seq for seq, _ in engine.step()] == [a, d, c] and engine.lookahead_discarded == discarded + 1
    assert d.slot == 1 and engine.pending.rows == [a, d, c]
    engine.cancel(a)  # the round ahead runs on for d and c
    assert [seq for seq, _ in engine.step()] == [d, c] and engine.lookahead_rounds == rounds + 2
    while engine.has_work:
        engine.step()
    assert b.finish_reason == a.finish_reason == "cancelled"
    assert b.generated == off[1].token_ids[: len(b.generated)] and len(b.generated) == 5
    assert a.generated == off[0].token_ids[: len(a.generated)]
    for seq, ref in ((c, off[2]), (d, off[3])):
        assert_same(engine.result(seq), ref, "row after cancels")
    assert engine.lookahead_discarded >= 1 and engine.step() == [] and engine.pending is None


def test_a_round_ahead_of_rows_that_all_finished_is_dropped_without_records(pair, prompts):
    """A row ending at a stop string leaves its round ahead pending: the engine has no work, and the next step drops
    it and returns nothing."""
    cfg = RouterConfig(threshold_bits=math.inf)
    engine = engine_with(pair, cfg, True)
    seq = engine.add(prompts[3], stop_in(pair, cfg, prompts[3], 12))
    while engine.has_work:
        engine.step()
    assert seq.finish_reason == "stop" and engine.pending is not None and engine.running == 0
    discarded = engine.lookahead_discarded
    assert engine.step() == [] and engine.pending is None and engine.lookahead_discarded == discarded + 1
    assert not engine.has_work


# --- when it does not run ---

def test_sampled_rows_and_the_hf_backend_never_run_ahead(pair, prompts):
    """Seeded sampling (a discarded round ahead would have drawn from the row's generator), a batch mixing a sampled
    row with greedy ones, and the transformers backend: no round ahead, the same output."""
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=15, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=15, ignore_eos=True)
    small_only = RouterConfig(threshold_bits=math.inf)
    for params in ([sampled], [greedy, sampled, greedy]):
        _, off = run(pair, small_only, prompts[: len(params)], params, False, 3)
        engine, on = run(pair, small_only, prompts[: len(params)], params, True, 3)
        assert [r.token_ids for r in on] == [r.token_ids for r in off]
        assert engine.lookahead_rounds == engine.lookahead_discarded == 0
    engine, _ = run(pair, small_only, prompts[:2], greedy, True, 2, engine_cfg=EngineConfig(backend="hf"))
    assert engine.lookahead_rounds == engine.lookahead_discarded == 0


# --- the throughput schedule ---

def throughput_run(pair, prompts, scripts, dwell: int, lookahead: bool, large_s: float, **schedule):
    """(engine, results, rounds) of the throughput schedule over scripted rows that declare `dwell`: small steps cost
    1 s and large ones `large_s` (scripted, not measured), the guard's clock says every round took 2 s, and the
    large group never waits too long. `rounds`: per round, (its group, whether a spell of the guard forced it,
    whether it was the round run ahead)."""
    engine = scripted_costs(BatchEngine(pair, RouterConfig(), NATIVE, max_batch=len(scripts), max_wait_steps=1e9,
                                        schedule="throughput", **schedule), 1.0, large_s)
    engine.lookahead = lookahead
    judged = engine._guard
    engine._guard = lambda tokens, seconds, running: judged(tokens, 2.0, running)
    seqs = [engine.add(p, PARAMS, ScriptedRouter(r, dwell)) for p, r in zip(prompts, scripts)]
    rounds = []
    while engine.has_work:
        ran = engine.lookahead_rounds
        events = engine.step()
        if events:
            rounds.append((events[0][1].role, engine.forced, engine.lookahead_rounds > ran))
    return engine, [engine.result(seq) for seq in seqs], rounds


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("case", ["spell", "phase", "waiting"])
def test_throughput_rounds_run_ahead_where_the_next_is_likely_the_same(pair, prompts, case, forced, request):
    """Spells of the guard (rows small for ever and one row large for ever, so that small rounds fail the guard),
    phases of large rounds (two rows whose large segments overlap, each declaring a dwell of 8), and small rounds
    beside a waiting large row: within a spell every round but its first runs ahead; within a phase, rounds run
    ahead while the phase outlasts the large rows that may leave; small rounds run ahead where the rule picks them
    again; none is discarded here. Forced (every round ahead, `every_round_ahead`), rounds are discarded, riders'
    caches rolled back too. Either way each row writes the same tokens with the same trace as with the lookahead
    off, and every token is the greedy token of the model its record names, on the row's whole prefix."""
    if forced:
        request.getfixturevalue("every_round_ahead")
    if case == "spell":
        scripts, dwell, large_s = [[S] * 40, [S] * 40, [S] * 12 + [L] * 40, [L] * 40], 0, 2.0
        schedule = {"guard_rounds": 3, "large_phase": None}
    elif case == "phase":
        scripts, dwell, large_s = [[S] * 40, [S] * 8 + [L] * 10 + [S] * 40, [S] * 10 + [L] * 14 + [S] * 40,
                                   [S] * 40], 8, 100.0
        schedule = {"guard_rounds": 0, "large_phase": (0.5, 0.25)}
    else:  # three small rows while a large one waits (no bound): the rule picks small until they are done
        scripts, dwell, large_s = [[S] * 40, [S] * 40, [S] * 40, [L] * 40], 0, 100.0
        schedule = {"guard_rounds": 0, "large_phase": None}
    _, off, rounds_off = throughput_run(pair, prompts, scripts, dwell, False, large_s, **schedule)
    engine, on, rounds = throughput_run(pair, prompts, scripts, dwell, True, large_s, **schedule)
    assert [r[:2] for r in rounds] == [r[:2] for r in rounds_off]  # the same rounds
    for i, (a, b) in enumerate(zip(on, off)):
        assert_same(a, b, f"row {i}")
    models = {S: pair.small.model, L: pair.large.model}
    for prompt, res in zip(prompts, on):
        for step in res.trace.steps:
            assert step.token_id == next_token(models[step.role], prompt + res.token_ids[: step.index])[0]
    ahead = [ran for role, _, ran in rounds if role is L]
    small_ahead = [ran for role, _, ran in rounds if role is S]
    if forced:  # the waiting case's rounds are what the engine expects anyway
        assert (engine.lookahead_discarded > 0) is (case != "waiting") and any(ahead) and any(small_ahead)
        return
    assert engine.lookahead_discarded == 0
    if case == "spell":  # every forced round runs ahead but the first of its spell, and only those large rounds
        forced = [f for _, f, _ in rounds]
        spells = sum(f and not (i and forced[i - 1]) for i, f in enumerate(forced))
        assert spells >= 2 and sum(ahead) == sum(forced) - spells > 0
        assert all(f for role, f, ran in rounds if ran and role is L)
    elif case == "phase":
        assert engine.fallback_rounds == 0 and any(ahead) and not all(ahead) and any(small_ahead)
    else:  # every small round but the first (the prompt's) ran ahead beside the waiting large row
        assert small_ahead == [False] + [True] * 39 and not any(ahead)


def test_the_config_flag_turns_it_off(pair):
    assert not BatchEngine(pair, engine_cfg=EngineConfig(backend="native", lookahead=False)).lookahead
    assert EngineConfig().lookahead
    with pytest.raises(ConfigError, match="lookahead must be True or False"):
        EngineConfig(lookahead="yes")


@pytest.mark.parametrize("router, keeps", [
    (Router(RouterConfig(threshold_bits=0.5, min_dwell_tokens=10)), True),  # the dwell holds
    (Router(RouterConfig(threshold_bits=0.5, min_dwell_tokens=1)), False),  # the next token may switch
    (Router(RouterConfig(threshold_bits=0.5, min_dwell_tokens=0)), False),
    (Router(RouterConfig(threshold_bits=math.inf, min_dwell_tokens=0)), True),  # small for ever
    (Router(RouterConfig(threshold_bits=math.inf, min_dwell_tokens=0, start=L)), False),  # leaves large
    (Router(RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=L)), True),  # large for ever
    (ScriptedRouter([L]), True),
    (ScriptedRouter([L, L, S]), False),  # a script may switch until its end
])
def test_which_routers_keep_their_model_at_the_next_token(router, keeps):
    """A large round runs ahead only where no row's router may switch at the next token; checked against each
    router itself, observing one more token."""
    assert _keeps_model(router) is keeps
    before = router.active
    assert (router.observe(1.0) is before) or not keeps


def test_a_script_of_the_rule_declares_what_the_rule_knows():
    """ead bench's scripts (the paper's rule on a synthetic entropy stream) declare the rule's dwell: at every token the
    engine can count on exactly what it could with the rule itself reading that stream, and the script does keep its
    model wherever that says so; past its end (its last token on) it keeps its last role for certain. A script
    switching within the dwell it declares is refused."""
    stream = entropy_stream(200, seed=5)
    roles = roles_for_share(200, 0.3, seed=5)
    tau = next(t / 1000 for t in range(4000) if paper_roles(stream, t / 1000) == roles)
    rule, script = Router(RouterConfig(threshold_bits=tau)), ScriptedRouter.of_rule(roles)
    claims = []
    for i, bits in enumerate(stream):
        assert _keeps_model(script) == (_keeps_model(rule) or i == len(stream) - 1)
        claims.append(_keeps_model(script))
        before = script.active
        assert rule.observe(bits) is script.observe(bits)
        assert script.active is before or not claims[-1]
    assert 0 < sum(claims) < len(claims) and 0 < sum(r is L for r in roles) < len(roles)
    with pytest.raises(ConfigError, match="switches 2 tokens after token 3, within its dwell of 3"):
        ScriptedRouter([S] * 3 + [L] * 2 + [S] * 5, 3)


# --- the runner ---

def test_decode_from_device_gives_feed_manys_logits_and_transformers(pair):
    """Tokens given on the device (float32 as in a summary, or int64), slots out of order: the same logits and
    summary as feed_many with the tokens on the host, the HF model's logits on each slot's whole text, and the
    same `seen`; and a token past the context is refused before the cache is touched."""
    model = pair.large.model
    vocab = model.config.vocab_size
    runners = [NativeBatchRunner.from_hf(model, vocab, max_seq_tokens=16, max_batch=4) for _ in range(2)]
    texts = {0: [5, 9, 40], 2: [7, 3, 100, 4, 8]}
    for runner in runners:
        runner.feed_many(list(texts), list(texts.values()))
    for step, dtype in enumerate((torch.float32, torch.int64)):
        new = {2: [11 + step], 0: [30 + step]}  # slots in another order than they were filled
        ref_logits, ref_summary = runners[0].feed_many(list(new), list(new.values()), with_summary=True)
        tokens = torch.tensor([t for [t] in new.values()], dtype=dtype)
        logits, summary = runners[1].decode_from_device(list(new), tokens)
        assert torch.equal(logits, ref_logits) and torch.equal(summary, ref_summary)
        assert runners[1].seen == runners[0].seen
        for i, (s, [t]) in enumerate(new.items()):
            texts[s] = texts[s] + [t]
            with torch.no_grad():
                ref = model(torch.tensor([texts[s]])).logits[0, -1]
            err = ((logits[i] - ref).abs().max() / ref.abs().max()).item()
            assert err < MAX_REL_ERR, f"slot {s}: max rel err {err:.2e}"
            assert int(summary[i, 4]) == int(ref.argmax())
    runner = runners[1]
    runner.feed_many([2], [list(range(20, 29))])  # slot 2 now holds 16 tokens, the whole context
    with pytest.raises(CacheCapacityError, match="needs 17 tokens"):
        runner.decode_from_device([0, 2], torch.tensor([1.0, 2.0]))
    assert runner.seen == [5, 0, 16, 0] and runner.cache.lengths.tolist() == [5, 0, 16, 0]
