"""Speculative decoding and EAD + speculation against independent references.

Greedy: the text equals transformers' `generate` of the large model, token for token, whatever the draft length,
batch or backend. Hybrid: every token equals the argmax of the model that wrote it, each model run without a
cache on the full prefix. Sampling: the empirical distribution of whole continuations matches the large model's
exact one (chi-square), through the engine on small fake runners with peaked distributions, and the same test
rejects a wrong acceptance rule. Acceptance statistics: a scripted case counted by hand.
"""

import json
import math
import statistics
from itertools import pairwise, product

import pytest
import torch
from transformers import AutoModelForCausalLM

import ead
import ead.speculative
from ead.config import EngineConfig, Role, RouterConfig, SpeculativeConfig
from ead.engine import BatchEngine, Engine
from ead.errors import ConfigError
from ead.metrics import VerifyEvent
from ead.router import ScriptedRouter
from ead.sampling import SamplingParams
from ead.speculative import Speculator, accept_greedy

from conftest import gsm8k_questions

pytestmark = pytest.mark.usefixtures("one_thread")
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)
S, L = Role.SMALL, Role.LARGE


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tiny_pairs, tmp_path_factory):
    """The tiny large model and, as the small one, a copy of it with a noisy output head: its greedy drafts are
    accepted about half the time (a random small model would never be), so acceptance and rollback both run."""
    large = tiny_pairs[request.param][1]
    model = AutoModelForCausalLM.from_pretrained(large)
    with torch.no_grad():
        w = model.lm_head.weight
        w += 0.3 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("near") / f"{request.param}-near"
    model.save_pretrained(folder)
    ead.load_pair(large, large, device="cpu").tokenizer.save_pretrained(folder)
    return ead.load_pair(str(folder), large, device="cpu")


@pytest.fixture(scope="module")
def prompts(pair):
    return [pair.encode(q[: 30 + 41 * i]) for i, q in enumerate(gsm8k_questions(4))]


@pytest.fixture(scope="module")
def large_greedy(pair, prompts):
    """transformers' own greedy generate of the large model: the reference speculation must reproduce."""
    out = []
    for ids in prompts:
        gen = pair.large.model.generate(torch.tensor([ids]), max_new_tokens=PARAMS.max_new_tokens, do_sample=False,
                                        pad_token_id=0, eos_token_id=None, attention_mask=torch.ones(1, len(ids),
                                                                                                   dtype=torch.long))
        out.append(gen[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("backend, gamma, confidence, max_batch", [
    ("hf", 1, None, 1), ("hf", 4, None, 3), ("hf", 8, None, 4), ("native", 1, None, 4), ("native", 3, None, 3),
    ("native", 8, None, 2), ("native", 4, 0.2, 4), ("hf", 6, 0.2, 2)])
def test_greedy_speculation_writes_the_large_models_text(pair, prompts, large_greedy, backend, gamma, confidence,
                                                         max_batch):
    """Rows of different lengths, more rows than slots, each accepting its own number of tokens per pass."""
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend=backend), max_batch=max_batch,
                         mode="speculative", speculative=SpeculativeConfig(gamma, confidence))
    results = engine.generate_many(prompts, PARAMS)
    for i, (ref, res) in enumerate(zip(large_greedy, results)):
        first = next((k for k, (a, b) in enumerate(zip(ref, res.token_ids)) if a != b), None)
        assert res.token_ids == ref, f"row {i}: first mismatch at token {first}"
        assert all(s.role is L for s in res.trace.steps) and res.stats.large_share == 1.0
        v = res.trace.verifications
        assert sum(e.emitted for e in v) == len(res.token_ids) == PARAMS.max_new_tokens
        assert all(e.drafted <= gamma and e.accepted <= e.drafted and e.emitted <= e.accepted + 1 for e in v)
    drafted = [e.drafted for r in results for e in r.trace.verifications]
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert 0 < accepted < sum(drafted), "the test needs drafts both accepted and rejected"
    if confidence is not None:  # the adaptive length stopped some drafts before gamma or the budget did
        assert any(e.drafted < min(gamma, PARAMS.max_new_tokens - e.index - 1)
                   for r in results for e in r.trace.verifications)


def check_each_token_is_its_writers_argmax(pair, prompt, res):
    models = {S: pair.small.model, L: pair.large.model}
    full = prompt + res.token_ids
    with torch.no_grad():
        logits = {role: m(torch.tensor([full])).logits[0] for role, m in models.items()}
    for step in res.trace.steps:
        ref = logits[step.role][len(prompt) + step.index - 1]
        assert step.token_id == int(ref.argmax()), f"token {step.index} by {step.role.value}"
        if step.role is L:  # the router saw the large model's distribution at this position
            p = ref.float().softmax(-1)
            bits = float(-(p * p.log2()).sum())
            assert step.entropy_bits == pytest.approx(bits, abs=1e-3)


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_hybrid_segments_are_each_models_own_greedy_text(pair, prompts, backend):
    """Scripted segments, so the realised roles are known: large segments are the large model's text from the
    same prefix (written by speculation), small ones the small model's; the trace reports share and switches."""
    scripts = [[S] * 3 + [L] * 9 + [S] * 4 + [L] * 8, [L] * 7 + [S] * 7 + [L] * 10, [S] * 24]
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend=backend), max_batch=3, mode="hybrid",
                         speculative=SpeculativeConfig(4))
    results = engine.generate_many(prompts[:3], PARAMS, [ScriptedRouter(s) for s in scripts])
    for prompt, script, res in zip(prompts, scripts, results):
        assert [s.role for s in res.trace.steps] == script
        check_each_token_is_its_writers_argmax(pair, prompt, res)
        n_large = script.count(L)
        assert res.stats.large_share == pytest.approx(n_large / len(script))
        assert res.stats.switches == sum(a is not b for a, b in pairwise(script))
        assert sum(e.emitted for e in res.trace.verifications) == n_large
    assert results[0].stats.accepted_tokens > 0


def test_hybrid_with_the_paper_rule(pair, prompts):
    """The EAD rule itself picks segments from the signals it is given (large model's at large tokens)."""
    probe = Engine(pair, RouterConfig(threshold_bits=math.inf)).generate(prompts[1], PARAMS)
    tau = statistics.median(s.entropy_bits for s in probe.trace.steps)
    cfg = RouterConfig(threshold_bits=tau, window_tokens=2, min_dwell_tokens=2)
    res = Engine(pair, cfg, mode="hybrid", speculative=SpeculativeConfig(3)).generate(
        prompts[1], SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert res.stats.switches >= 2 and 0 < res.stats.large_share < 1
    check_each_token_is_its_writers_argmax(pair, prompts[1], res)
    ent = [s.entropy_bits for s in res.trace.steps]  # the router's mean is over what it was given, token by token
    assert [s.mean_bits for s in res.trace.steps] == pytest.approx(
        [statistics.mean(ent[max(0, i - 1): i + 1]) for i in range(len(ent))])


class FakeRunner:
    """A batched runner whose logits are a function of the text: `next_logits(text) -> (V,)`. It keeps each
    slot's text, so a rollback that leaves the wrong text shows up as wrong logits."""

    def __init__(self, next_logits, vocab_size, max_batch=64, max_seq_tokens=64):
        self.next_logits, self.vocab_size = next_logits, vocab_size
        self.max_batch, self.max_seq_tokens = max_batch, max_seq_tokens
        self.texts = [[] for _ in range(max_batch)]

    @property
    def seen(self):
        return [len(t) for t in self.texts]

    def reset(self, slot):
        self.texts[slot] = []

    def truncate(self, slot, n_tokens):
        assert n_tokens <= len(self.texts[slot])
        self.texts[slot] = self.texts[slot][:n_tokens]

    def feed_many(self, slots, ids, all_logits=False):
        out = []
        for slot, new in zip(slots, ids):
            start = len(self.texts[slot])
            self.texts[slot] += new
            out.append(torch.stack([self.next_logits(self.texts[slot][: start + k + 1]) for k in range(len(new))]))
        return out if all_logits else torch.stack([o[-1] for o in out])


def fake_engine(pair, small, large, gamma, mode="speculative", max_batch=64):
    engine = BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=max_batch, mode=mode)
    engine.runners = {S: small, L: large}
    engine.max_seq_tokens = small.max_seq_tokens
    engine.speculator = Speculator(small, large, SpeculativeConfig(gamma), engine.max_seq_tokens, engine.token_signals)
    return engine


V = 4
TABLES = {role: 2.5 * torch.randn(V, V, V, generator=torch.Generator().manual_seed(seed)) for role, seed in
          ((S, 1), (L, 2))}  # logits given the last two tokens: peaked, and the models disagree


def markov(role):
    return lambda text: TABLES[role][text[-2] if len(text) > 1 else 0, text[-1]].clone()


def chi_square(counts: dict, expected: dict) -> tuple[float, float]:
    """(statistic, 0.999 quantile of its null distribution): cells expecting fewer than 5 merged into one;
    the quantile by the Wilson-Hilferty approximation (no scipy here)."""
    n = sum(counts.values())
    small = [c for c in expected if expected[c] * n < 5]
    obs = [counts.get(c, 0) for c in expected if c not in small] + [sum(counts.get(c, 0) for c in small)]
    exp = [expected[c] * n for c in expected if c not in small] + [sum(expected[c] for c in small) * n]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    k = sum(e > 0 for e in exp) - 1
    z = statistics.NormalDist().inv_cdf(0.999)
    return stat, k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def always_accept(draft, q, p, generator):
    """A wrong rule: keep every draft token, then the large model's bonus token."""
    return len(draft), draft + [int(torch.multinomial(p[len(draft)], 1, generator=generator))]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True),
                                    SamplingParams(temperature=0.7, top_k=3, max_new_tokens=3, ignore_eos=True)])
def test_speculative_sampling_follows_the_large_models_distribution(tiny_pairs, params, monkeypatch):
    """Whole 3-token continuations (64 cells), drafted 2 at a time, so a round can accept, reject or add a bonus
    token, against the large model's exact joint distribution; then the same test fails always-accept."""
    pair = ead.load_pair(*tiny_pairs["qwen2"], device="cpu")
    prompt = [1, 3]
    probs = lambda text: ead.sampling.sampling_probs(TABLES[L][text[-2], text[-1]], params)
    expected = {}
    for cont in product(range(V), repeat=3):
        text, pr = list(prompt), 1.0
        for t in cont:
            pr *= float(probs(text)[t])
            text.append(t)
        expected[cont] = pr

    def run(n=3000):
        torch.manual_seed(0)
        engine = fake_engine(pair, FakeRunner(markov(S), V), FakeRunner(markov(L), V), gamma=2)
        results = engine.generate_many([prompt] * n, params)
        counts = {}
        for r in results:
            counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        rate = sum(r.stats.accepted_tokens for r in results) / sum(r.stats.draft_tokens for r in results)
        return counts, rate

    counts, rate = run()
    stat, limit = chi_square(counts, expected)
    assert stat < limit, f"chi-square {stat:.1f} above its 0.999 quantile {limit:.1f}"
    assert 0.1 < rate < 0.9, f"acceptance rate {rate:.2f}: the test needs both outcomes"
    monkeypatch.setattr(ead.speculative, "accept_sampled", always_accept)
    wrong, _ = run()
    stat, limit = chi_square(wrong, expected)
    assert stat > limit, f"always-accept passed: chi-square {stat:.1f} <= {limit:.1f}"


def test_acceptance_statistics_on_a_scripted_case(tiny_pairs):
    """The large model writes 0, 1, 2, ...; the small one drafts the same except at generated tokens 2, 3
    and 7. gamma 3, 10 tokens, counted by hand:
      pass 1 at 0: drafts 0 1 (2 wrong) -> accepts 2, writes 0 1 2
      pass 2 at 3: drafts (3 wrong) ... -> accepts 0, writes 3
      pass 3 at 4: drafts 4 5 6         -> accepts 3, writes 4 5 6 7 (bonus)
      pass 4 at 8: one draft (budget: 10 - 8 - 1), 8 -> accepts 1, writes 8 9 (bonus)
    """
    pair = ead.load_pair(*tiny_pairs["qwen2"], device="cpu")
    prompt, vocab = [1, 3], 16

    def script(wrong):
        def next_logits(text):
            g = len(text) - len(prompt)  # the generated token these logits predict
            return 8.0 * torch.nn.functional.one_hot(torch.tensor((g + 5 if g in wrong else g) % vocab), vocab).float()
        return next_logits

    engine = fake_engine(pair, FakeRunner(script({2, 3, 7}), vocab), FakeRunner(script(set()), vocab), gamma=3)
    [res] = engine.generate_many([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert res.token_ids == list(range(10))
    assert res.trace.verifications == [VerifyEvent(0, 3, 2, 3), VerifyEvent(3, 3, 0, 1), VerifyEvent(4, 3, 3, 4),
                                       VerifyEvent(8, 1, 1, 2)]
    s = res.stats
    assert (s.verify_passes, s.draft_tokens, s.accepted_tokens) == (4, 10, 6)
    assert (s.acceptance_rate, s.mean_accepted_tokens, s.tokens_per_large_pass) == (0.6, 1.5, 2.5)
    assert s.tokens_large == 10 and s.prefill_tokens_large == 2 and s.prefill_tokens_small == 2


def test_accept_greedy_by_hand():
    assert accept_greedy([5, 6, 7], [5, 6, 9, 1]) == (2, [5, 6, 9])
    assert accept_greedy([5, 6], [5, 6, 4]) == (2, [5, 6, 4])
    assert accept_greedy([], [3]) == (0, [3])


def test_modes_are_validated_and_the_cli_and_api_take_them(pair, prompts, large_greedy):
    with pytest.raises(ConfigError, match="mode"):
        BatchEngine(pair, mode="turbo")
    with pytest.raises(ConfigError, match="gamma"):
        SpeculativeConfig(0)
    with pytest.raises(ConfigError, match="draft_confidence"):
        SpeculativeConfig(4, 1.5)
    text = gsm8k_questions(1)[0][:50]
    [res] = ead.generate(pair, text, sampling=PARAMS, mode="speculative", speculative=SpeculativeConfig(5))
    [ref] = ead.generate(pair, text, RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=L), PARAMS)
    assert res.token_ids == ref.token_ids and res.stats.verify_passes > 0
    seen = []
    res = Engine(pair, mode="speculative").generate(prompts[0], PARAMS, on_step=lambda seq, r: seen.append(r.index))
    assert seen == list(range(PARAMS.max_new_tokens))  # every token streamed once, in order


def test_cli_mode_flags_stream_the_large_models_text(capsys, tiny_pairs):
    from ead.cli import main

    small, large = tiny_pairs["qwen2"]
    argv = ["generate", "--small", small, "--large", large, "--device", "cpu", "--raw", "--max-new-tokens", "16",
            "--ignore-eos", "Natalia sold clips"]
    assert main([*argv, "--tau=-inf", "--d-min", "0", "--start", "large"]) == 0
    reference, _ = capsys.readouterr()
    assert main([*argv, "--mode", "speculative", "--gamma", "3", "--draft-confidence", "0.1"]) == 0
    out, err = capsys.readouterr()
    assert out == reference and "of drafts accepted" in err
    assert main([*argv, "--mode", "hybrid", "--json"]) == 0
    assert json.loads(capsys.readouterr()[0])["stats"]["verify_passes"] >= 0
    assert main([*argv, "--mode", "speculative", "--gamma", "0"]) == 2
    assert "gamma must be an integer >= 1" in capsys.readouterr()[1]
