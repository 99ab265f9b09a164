"""The EAD loop against independent references: HF `generate` for single-model runs, and for runs that switch,
each model run from scratch (no cache) on the full prefix, which proves catch-up feeds the caches right."""

import math

import numpy as np
import pytest
import torch

import ead
from ead.config import Role, RouterConfig
from ead.engine import Engine
from ead.sampling import SamplingParams

from conftest import ARCHS

PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_pairs):
    small, large = tiny_pairs[request.param]
    return ead.load_pair(small, large, device="cpu")


def hf_greedy(model, prompt_ids, n, eos_ids):
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(eos_ids), pad_token_id=0, attention_mask=torch.ones(1, len(prompt_ids),
                                                                                              dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def test_never_large_equals_hf_generate_of_the_small_model(pair):
    ids = pair.encode(PROMPT)
    res = Engine(pair, RouterConfig(threshold_bits=math.inf)).generate(ids, SamplingParams(max_new_tokens=40))
    assert res.token_ids == hf_greedy(pair.small.model, ids, 40, pair.eos_token_ids)
    assert res.stats.tokens_large == 0 and res.stats.large_share == 0 and res.stats.switches == 0
    assert res.stats.cost_ratio == pytest.approx(pair.small.params / pair.large.params)


def test_always_large_equals_hf_generate_of_the_large_model(pair):
    ids = pair.encode([{"role": "user", "content": PROMPT}])
    cfg = RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=Role.LARGE)
    res = Engine(pair, cfg).generate(ids, SamplingParams(max_new_tokens=40))
    assert res.token_ids == hf_greedy(pair.large.model, ids, 40, pair.eos_token_ids)
    assert res.stats.tokens_small == 0 and res.stats.cost_ratio == 1.0
    assert res.stats.prefill_tokens_small == 0 and res.stats.prefill_tokens_large == len(ids)


def entropy_bits_numpy(logits: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


def switching_run(pair, n=60, window=2, d_min=2):
    """A greedy EAD run with tau at the median entropy of a small-only run, so both models write."""
    ids = pair.encode(PROMPT)
    probe = Engine(pair, RouterConfig(threshold_bits=math.inf)).generate(ids, SamplingParams(max_new_tokens=n))
    tau = float(np.median([s.entropy_bits for s in probe.trace.steps]))
    cfg = RouterConfig(threshold_bits=tau, window_tokens=window, min_dwell_tokens=d_min)
    return ids, Engine(pair, cfg).generate(ids, SamplingParams(max_new_tokens=n))


def test_every_token_is_the_active_models_choice_on_the_full_prefix(pair):
    prompt, res = switching_run(pair)
    assert res.stats.switches >= 4 and res.stats.tokens_small > 0 and res.stats.tokens_large > 0
    assert {s.to for s in res.trace.switches} == {Role.SMALL, Role.LARGE}  # switches both ways
    models = {Role.SMALL: pair.small.model, Role.LARGE: pair.large.model}
    full = prompt + res.token_ids
    with torch.no_grad():
        logits = {role: m(torch.tensor([full])).logits[0].float().numpy() for role, m in models.items()}
    for step in res.trace.steps:
        pos = len(prompt) + step.index - 1  # the logits at this position predict the token at index
        ref = logits[step.role][pos]
        assert step.token_id == int(ref.argmax()), f"token {step.index} by {step.role.value}"
        assert step.entropy_bits == pytest.approx(entropy_bits_numpy(ref), abs=1e-4), f"entropy of token {step.index}"


def test_trace_accounting_matches_the_role_sequence(pair):
    prompt, res = switching_run(pair)
    roles = [s.role for s in res.trace.steps]
    # Independent recount: a model that last wrote token p has fed the ids before p, so taking over at i it
    # reads tokens p..i-1; a model that never wrote reads all i generated tokens.
    last_written = {Role.SMALL: None, Role.LARGE: None}
    expected_switches = []
    for i, role in enumerate(roles):
        if i > 0 and role is not roles[i - 1]:
            prev = last_written[role]
            expected_switches.append((i, role, i if prev is None else i - prev))
        last_written[role] = i
    assert [(s.index, s.to, s.catchup_tokens) for s in res.trace.switches] == expected_switches
    assert res.stats.catchup_tokens == sum(c for _, _, c in expected_switches)
    f = roles.count(Role.LARGE) / len(roles)
    assert res.stats.large_share == pytest.approx(f)
    assert res.stats.cost_ratio == pytest.approx(((1 - f) * pair.small.params + f * pair.large.params)
                                                 / pair.large.params)
    assert res.stats.prefill_tokens_small == len(prompt) == res.stats.prefill_tokens_large
    # Rolling mean in the trace is the mean of the last `window` entropies.
    ent = [s.entropy_bits for s in res.trace.steps]
    assert [s.mean_bits for s in res.trace.steps] == pytest.approx(
        [np.mean(ent[max(0, i - 1): i + 1]) for i in range(len(ent))])


def test_seeded_sampling_is_reproducible(pair):
    ids = pair.encode(PROMPT)
    engine = Engine(pair, RouterConfig(threshold_bits=7.0, window_tokens=2, min_dwell_tokens=2))
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_new_tokens=30)
    a, b = engine.generate(ids, params), engine.generate(ids, params)
    assert a.token_ids == b.token_ids and [s.role for s in a.trace.steps] == [s.role for s in b.trace.steps]
    c = engine.generate(ids, SamplingParams(temperature=1.0, seed=99, max_new_tokens=30))
    assert c.token_ids != a.token_ids


def test_public_generate_takes_prompts_and_messages(tiny_pairs):
    pair = ead.load_pair(*tiny_pairs["qwen2"], device="cpu")
    out = ead.generate(pair, [PROMPT, [{"role": "user", "content": PROMPT}]], RouterConfig(),
                       SamplingParams(max_new_tokens=5))
    assert len(out) == 2 and all(len(r.token_ids) <= 5 for r in out)
    assert out[0].prompt_token_ids == pair.tokenizer(PROMPT).input_ids
    [single] = ead.generate(pair, PROMPT, sampling=SamplingParams(max_new_tokens=5))
    assert single.token_ids == out[0].token_ids
    assert single.to_dict()["trace"]["steps"][0]["role"] in ("small", "large")
