"""BatchEngine against independent references: each row run alone, transformers on the full prefix.

Rows of different lengths, each with its own router, switching at different steps, must write exactly the
tokens they write alone (greedy), through both backends; the native batched runner's logits for a ragged
batch with different lags must match transformers without a cache; and the scheduler must step one group
per round, never let a group wait more than its bound, and free and reuse slots.
"""

import math

import numpy as np
import pytest
import torch

import ead
from ead.config import EngineConfig, Role, RouterConfig
from ead.engine import BatchEngine, Engine
from ead.errors import CacheCapacityError, ConfigError, RequestError
from ead.runner import NativeBatchRunner
from ead.router import ScriptedRouter
from ead.sampling import SamplingParams

from conftest import gsm8k_questions

MAX_REL_ERR = 1e-4  # float32, as in models/test_transformer.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tiny_pairs):
    return ead.load_pair(*tiny_pairs[request.param], device="cpu")


@pytest.fixture(scope="module")
def prompts(pair):
    """Five prompts of different lengths (more than the batch holds, so some wait for a slot)."""
    return [pair.encode(q[: 40 + 37 * i]) for i, q in enumerate(gsm8k_questions(5))]


@pytest.fixture(scope="module")
def cfg(pair, prompts):
    """tau at the median entropy of small-only runs, so every row switches, each at its own steps."""
    probe = Engine(pair, RouterConfig(threshold_bits=math.inf)).generate(prompts[0], SamplingParams(max_new_tokens=40))
    tau = float(np.median([s.entropy_bits for s in probe.trace.steps]))
    return RouterConfig(threshold_bits=tau, window_tokens=2, min_dwell_tokens=2)


PARAMS = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(pair, prompts, cfg):
    return [Engine(pair, cfg, EngineConfig(backend="hf")).generate(p, PARAMS) for p in prompts]


@pytest.mark.parametrize("backend, max_batch", [("hf", 3), ("native", 2), ("native", 3), ("native", 5)])
def test_batched_rows_write_what_each_row_writes_alone(pair, prompts, cfg, alone, backend, max_batch):
    """Several batch sizes, so that rounds mix rows catching up with rows decoding one token, in varied
    slot orders (a mix-up of rows between the two passes once showed only at one batch size)."""
    engine = BatchEngine(pair, cfg, EngineConfig(backend=backend), max_batch=max_batch)
    together = engine.generate_many(prompts, PARAMS)
    for i, (a, b) in enumerate(zip(alone, together)):
        assert b.token_ids == a.token_ids, f"row {i} differs from its run alone"
        assert [s.role for s in b.trace.steps] == [s.role for s in a.trace.steps], f"row {i}: roles differ"
        assert b.stats.switches == a.stats.switches and b.finish_reason == "length"
    # The test means something only if rows switch, and not all at the same token.
    switch_points = {tuple(s.index for s in r.trace.switches) for r in together}
    assert all(r.stats.switches >= 2 for r in together) and len(switch_points) > 1
    assert engine.running == 0 and engine.waiting == 0 and not engine.has_work


def test_ead_generate_batches_prompts_and_keeps_their_order(pair, cfg, alone, prompts):
    texts = [pair.decode(p) for p in prompts]
    results = ead.generate(pair, texts, cfg, PARAMS, max_batch=2)
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]


def test_native_batch_runner_matches_transformers_on_ragged_rows_with_different_lags(pair):
    """Three slots fed chunks of different lengths per call (prefill, catch-up, one token, idle), compared
    with the model run without a cache on each slot's whole text."""
    model = pair.large.model
    vocab = model.config.vocab_size
    runner = NativeBatchRunner.from_hf(model, vocab, max_seq_tokens=128, max_batch=4)
    texts = {0: [], 1: [], 3: []}
    calls = [
        {0: [5, 9, 40, 41, 7], 1: [3, 100], 3: [8, 8, 9, 10, 11, 12, 13, 14]},  # prefills of different lengths
        {0: [12], 3: [15, 16, 17]},  # slot 1 idle; slot 3 catches up 3 tokens
        {1: [20, 21, 22, 23, 24, 25], 3: [30], 0: [31, 32]},  # different lags in one call, order shuffled
        {3: [33]},  # one slot alone, the highest
    ]
    for call in calls:
        slots = list(call)
        out = runner.feed_many(slots, [call[s] for s in slots])
        assert out.shape == (len(slots), vocab) and out.dtype == torch.float32
        for i, s in enumerate(slots):
            texts[s] += call[s]
            with torch.no_grad():
                ref = model(torch.tensor([texts[s]])).logits[0, -1]
            err = ((out[i] - ref).abs().max() / ref.abs().max()).item()
            assert err < MAX_REL_ERR, f"slot {s} after {call[s]}: max rel err {err:.2e}"
            assert runner.seen[s] == len(texts[s])
    runner.reset(0)
    out = runner.feed_many([0], [[5, 9]])
    with torch.no_grad():
        ref = model(torch.tensor([[5, 9]])).logits[0, -1]
    assert ((out[0] - ref).abs().max() / ref.abs().max()).item() < MAX_REL_ERR  # a reset slot starts clean


@pytest.mark.parametrize("max_wait_steps", [0.0, 1e9])
def test_two_groups_never_step_together_and_the_wait_bound_holds(pair, prompts, max_wait_steps):
    """With no wait allowed, a group with rows never waits two rounds in a row; with an unbounded wait, the
    large group steps exactly when it holds at least `large_fill` of the running rows."""
    S, L = Role.SMALL, Role.LARGE
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=4, max_wait_steps=max_wait_steps,
                         large_fill=0.6)
    scripts = [[S] * 5 + [L] * 10 + [S] * 15, [L] * 30, [S] * 30, [S, L] * 15]
    seqs = [engine.add(p, PARAMS if i != 3 else SamplingParams(max_new_tokens=30, ignore_eos=True), ScriptedRouter(r))
            for i, (p, r) in enumerate(zip(prompts, scripts))]
    waited = {S: 0, L: 0}
    while engine.has_work:
        before = {seq: seq.router.active for seq in seqs if seq.finish_reason is None}
        sizes = {role: sum(r is role for r in before.values()) for role in (S, L)}
        events = engine.step()
        stepped = {record.role for _, record in events}
        assert len(stepped) == 1, f"one round stepped both groups: {stepped}"
        [role] = stepped
        # every row of the chosen group got a token, and only those
        assert {seq for seq, _ in events} == {seq for seq, r in before.items() if r is role}
        other = L if role is S else S
        if max_wait_steps == 0:
            waited[other] = waited[other] + 1 if sizes[other] else 0
            waited[role] = 0
            assert waited[other] <= 1, "a group waited two rounds with no wait allowed"
        elif sizes[other]:
            assert (role is L) == (sizes[L] >= 0.6 * (sizes[L] + sizes[S]))
    for seq, script in zip(seqs, scripts):
        assert [s.role for s in seq.trace.steps] == (script + script[-1:] * 40)[: len(seq.trace.steps)]
    assert engine.rounds[S] + engine.rounds[L] > 0 and engine.rows_stepped[L] >= engine.rounds[L]


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_models_on_two_devices_step_both_groups_in_one_round(pair, prompts, cfg, alone, backend):
    """With the models on two GPUs a round steps both groups at once (`concurrent`, set by hand here: on the CPU
    both models share one device). Every row still writes what it writes alone, in fewer rounds."""
    engine = BatchEngine(pair, cfg, EngineConfig(backend=backend), max_batch=3)
    assert not engine.concurrent, "one device: one group per round"
    engine.concurrent = True
    seqs = [engine.add(p, PARAMS) for p in prompts]
    rounds_with_both = 0
    while engine.has_work:
        running = {seq for seq in seqs if seq.slot is not None}
        events = engine.step()
        assert running <= {seq for seq, _ in events}, "every running row gets a token each round"
        rounds_with_both += len({record.role for _, record in events}) == 2
    assert rounds_with_both > 0
    for i, (a, seq) in enumerate(zip(alone, seqs)):
        assert seq.generated == a.token_ids, f"row {i} differs from its run alone"
        assert [s.role for s in seq.trace.steps] == [s.role for s in a.trace.steps], f"row {i}: roles differ"


def test_cancel_frees_the_slot_for_a_waiting_sequence_and_queue_order_holds(pair, prompts):
    engine = BatchEngine(pair, RouterConfig(threshold_bits=math.inf), EngineConfig(backend="native"), max_batch=2)
    a, b, c = (engine.add(p, SamplingParams(max_new_tokens=50, ignore_eos=True)) for p in prompts[:3])
    engine.step()
    assert (a.slot, b.slot, c.slot) == (0, 1, None) and engine.waiting == 1
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and a.slot is None and engine.running == 1
    engine.step()
    assert c.slot == 0 and len(c.generated) == 1
    alone = Engine(pair, RouterConfig(threshold_bits=math.inf)).generate(prompts[2], SamplingParams(max_new_tokens=5))
    while len(c.generated) < 5:
        engine.step()
    assert c.generated[:5] == alone.token_ids[:5]  # the reused slot held nothing of `a`
    engine.cancel(b)
    engine.cancel(c)
    engine.cancel(c)  # cancelling twice is harmless
    assert not engine.has_work and engine.step() == []


def test_seeded_sampling_in_a_batch_equals_the_row_alone(pair, prompts, cfg):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_new_tokens=20, ignore_eos=True) for s in (1, 2, 3)]
    together = BatchEngine(pair, cfg, max_batch=3).generate_many(prompts[:3], params)
    for p, ids, res in zip(params, prompts[:3], together):
        assert res.token_ids == Engine(pair, cfg).generate(ids, p).token_ids


def test_bad_batch_input_raises_typed_errors(pair):
    with pytest.raises(ConfigError, match="max_batch"):
        BatchEngine(pair, max_batch=0)
    with pytest.raises(ConfigError, match="max_wait_steps"):
        BatchEngine(pair, max_wait_steps=-1)
    with pytest.raises(ConfigError, match="large_fill"):
        BatchEngine(pair, large_fill=1.5)
    with pytest.raises(ConfigError, match="tensor-parallel sync supports mode 'ead' only"):
        BatchEngine(pair, mode="speculative", sync=lambda summary: summary)
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(max_seq_tokens=16))
    with pytest.raises(CacheCapacityError, match="shorten the prompt"):
        engine.add(list(range(3, 40)))
    with pytest.raises(RequestError, match="empty"):
        engine.add([])
    with pytest.raises(ConfigError, match="one SamplingParams"):
        engine.generate_many([[1, 2], [3, 4]], [SamplingParams()])
