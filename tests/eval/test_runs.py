"""Runs without the CLI: rows graded end to end from outputs we choose, the manifest, the spec's routers, the
one call into the engine, and reading a results file cut by a kill."""

import json
import math
from types import SimpleNamespace

import pytest

from ead.config import Role
import ead.engine
from ead.engine import Engine
from ead.errors import ConfigError
from ead.eval.control import RandomRouter, problem_seed
from ead.eval.datasets import load_dataset
from ead.eval.runs import RunSpec, execute_run, generate_rows, open_run, overall_large_share, read_rows
from ead.metrics import GenerateResult, StepRecord, Trace, summarize
from ead.pair import load_pair
from ead.routing import BudgetRouter, SignalRouter
from ead.sampling import SamplingParams


class ScriptedEngine:
    """Writes a chosen text per question, one token per word, each by the model the router picks; so grading
    sees exactly what the test decides. Words after a '|' are cut by max_new_tokens."""

    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs
        self.questions: list[str] = []
        self.pair = SimpleNamespace(encode=self.encode)
        self.max_seq_tokens = 1000

    def encode(self, messages: list[dict]) -> list[int]:
        self.questions.append(messages[0]["content"].split("\n\n")[0])
        return [len(self.questions) - 1] * 5

    def generate(self, ids, sampling, router=None) -> GenerateResult:
        text = self.outputs[self.questions[ids[0]]]
        cut = "|" in text
        text = text.replace("|", "")
        trace = Trace()
        for i, _ in enumerate(text.split()):
            trace.steps.append(StepRecord(i, 0, router.active, 1.0, 1.0, 1, 0.0))
            router.observe(1.0)
        stats = summarize(trace, 100, 1000, seconds=0.01 * len(trace.steps))
        return GenerateResult(text, [0] * len(trace.steps), list(ids), "length" if cut else "stop", trace, stats)


@pytest.fixture
def synthetic(tmp_path):
    rows = [("q1", "0.5", "half of it: \\boxed{\\frac{1}{2}}"),
            ("q2", "#### 1000", "The total is 1,000 dollars."),
            ("q3", "(1,2)", "\\boxed{(2,1)}"),
            ("q4", "7", "I keep thinking about it and | never finish"),
            ("q5", "\\frac{3}{2}", "so \\boxed{1.5}")]
    f = tmp_path / "synthetic.jsonl"
    f.write_text("\n".join(json.dumps({"question": q, "answer": a, "level": 1 + i % 2, "subject": "Algebra"})
                           for i, (q, a, _) in enumerate(rows)) + "\n")
    return load_dataset(str(f)), {q: out for q, _, out in rows}


def test_rows_are_graded_from_the_outputs(tmp_path, synthetic):
    dataset, outputs = synthetic
    spec = RunSpec(dataset=dataset.name, mode="ead", tau=0.5)
    state = open_run(tmp_path / "run", spec, dataset)
    rows = execute_run(state, ScriptedEngine(outputs), {"small": {"params": 100}}, progress=False)
    assert [r["correct"] for r in rows] == [True, True, False, False, True]
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "1000", "(2,1)", None, "1.5"]
    assert [r["finish_reason"] for r in rows] == ["stop", "stop", "stop", "length", "stop"]
    assert rows == read_rows(tmp_path / "run" / "results.jsonl")
    r = rows[1]  # 5 words, all small: the rule starts small and holds it for d_min = 10 tokens
    assert (r["tokens_small"], r["tokens_large"], r["large_share"], r["cost_ratio"]) == (5, 0, 0.0, 0.1)
    assert r["gold"] == "1000" and r["level"] == 2 and r["subject"] == "Algebra" and r["prompt"].startswith("q2\n\n")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"] == spec.to_json() and manifest["dataset"]["sha256"] == dataset.sha256
    assert manifest["grader"]["name"] == "math-verify" and set(manifest["versions"]) == {
        "ead", "torch", "transformers", "math-verify", "python"}


def test_random_rows_follow_the_seeded_router(tmp_path, synthetic):
    dataset, outputs = synthetic
    outputs = {q: " ".join(["w"] * 200) for q in outputs}
    spec = RunSpec(dataset=dataset.name, mode="random", large_share=0.5, d_min=10, seed=9)
    rows = execute_run(open_run(tmp_path, spec, dataset), ScriptedEngine(outputs), {}, progress=False)
    for row in rows:
        router = RandomRouter(0.5, problem_seed(9, row["id"]))
        expected = sum(r is Role.LARGE for r in _roles(router, 200))
        assert row["tokens_large"] == expected
    assert 0 < overall_large_share(rows) < 1


def _roles(router, n):
    out = []
    for _ in range(n):
        out.append(router.active)
        router.observe(1.0)
    return out


def test_spec_routers():
    small = RunSpec(dataset="d", mode="small").make_router("x")
    assert isinstance(small, SignalRouter) and small.threshold_up == math.inf and small.active is Role.SMALL
    large = RunSpec(dataset="d", mode="large").routing_config()
    assert (large.threshold, large.min_dwell_tokens, large.start) == (-math.inf, 0, Role.LARGE)
    ead = RunSpec(dataset="d", mode="ead", tau=0.25).make_router("x")
    assert type(ead) is SignalRouter
    assert (ead.cfg.signal, ead.threshold_up, ead.threshold_down) == ("entropy", 0.25, 0.25)
    assert isinstance(RunSpec(dataset="d", mode="random", large_share=0.2).make_router("x"), RandomRouter)
    assert RunSpec(dataset="d", mode="ead", tau=math.inf).to_json()["tau"] == "inf"


@pytest.mark.parametrize("signal,tau,tau_down", [("entropy", 0.4, 0.2), ("varentropy", 2.0, None), ("top1", 0.3, 0.1),
                                                 ("margin", 0.6, None)])
def test_each_signal_routes_at_its_thresholds(signal, tau, tau_down):
    for mode in ("ead", "hybrid"):
        router = RunSpec(dataset="d", mode=mode, tau=tau, tau_down=tau_down, signal=signal, d_min=3).make_router("x")
        assert type(router) is SignalRouter and router.cfg.signal == signal and router.cfg.min_dwell_tokens == 3
        assert (router.threshold_up, router.threshold_down) == (tau, tau if tau_down is None else tau_down)
    budget = RunSpec(dataset="d", mode="budget", large_share=0.25, tau=tau, signal=signal).make_router("x")
    assert type(budget) is BudgetRouter and budget.cfg.signal == signal
    assert (budget.target, budget.threshold) == (0.25, pytest.approx(tau))


def test_hysteresis_routes_as_the_rule_says():
    # window 1, dwell 0, up 0.4, down 0.2: 0.5 hands over to large, 0.3 keeps it large, 0.1 hands back.
    router = RunSpec(dataset="d", mode="ead", tau=0.4, tau_down=0.2, window=1, d_min=0).make_router("x")
    assert [router.observe(h) for h in (0.5, 0.3, 0.3, 0.1, 0.3)] == [Role.LARGE, Role.LARGE, Role.LARGE, Role.SMALL,
                                                                       Role.SMALL]


def test_labels():
    def label(**kw):
        return RunSpec(dataset="d", **kw).label()

    assert label(mode="ead", tau=0.5) == "EAD tau=0.5"
    assert label(mode="ead", tau=0.8, signal="varentropy") == "EAD varentropy tau=0.8"
    assert label(mode="ead", tau=0.4, tau_down=0.2) == "EAD tau=0.4/0.2 (hysteresis)"
    assert label(mode="ead", tau=0.4, tau_down=0.4) == "EAD tau=0.4"  # equal thresholds are the paper's rule
    assert label(mode="budget", large_share=0.25) == "EAD budget 25%"
    assert label(mode="budget", large_share=0.1, signal="top1") == "EAD top1 budget 10%"
    assert label(mode="hybrid", tau=0.3, signal="margin") == "hybrid margin tau=0.3"
    assert label(mode="random", large_share=0.25) == "random F=0.250"


def test_budget_rows_carry_their_realised_share(tmp_path, synthetic):
    """On a constant 1-bit stream a static tau of 0.5 hands every token after the first d_min to the large model;
    the budget controller holds each 200-token answer near its 25% target and records where tau ended."""
    dataset, outputs = synthetic
    outputs = {q: " ".join(["w"] * 200) for q in outputs}
    static = execute_run(open_run(tmp_path / "ead", RunSpec(dataset=dataset.name, mode="ead", tau=0.5), dataset),
                         ScriptedEngine(outputs), {}, progress=False)
    assert all(r["tokens_large"] == 190 for r in static) and all("tau_final" not in r for r in static)
    spec = RunSpec(dataset=dataset.name, mode="budget", large_share=0.25, tau=0.5)
    rows = execute_run(open_run(tmp_path / "budget", spec, dataset), ScriptedEngine(outputs), {}, progress=False)
    for r in rows:
        assert r["tokens_small"] + r["tokens_large"] == 200 and r["large_share"] == r["tokens_large"] / 200
        assert abs(r["large_share"] - 0.25) < 0.1 and 0.001 <= r["tau_final"] <= 20
    manifest = json.loads((tmp_path / "budget" / "manifest.json").read_text())
    assert manifest["label"] == "EAD budget 25%" and manifest["config"]["large_share"] == 0.25


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "fast"}, "mode must be one of"),
    ({"mode": "ead"}, "needs a threshold"),
    ({"mode": "random"}, "needs the large model's share"),
    ({"mode": "budget"}, "needs the target share"),
    ({"mode": "random", "large_share": 1.2}, "large share must be in"),
    ({"mode": "budget", "large_share": 1.2}, "target large share must be a fraction"),
    ({"mode": "ead", "tau": -1.0}, "tau for signal 'entropy' must be >= 0"),
    ({"mode": "ead", "tau": 1.5, "signal": "top1"}, "tau for signal 'top1' must be in \\[0, 1\\]"),
    ({"mode": "ead", "tau": 0.5, "signal": "loudness"}, "unknown routing signal 'loudness'"),
    ({"mode": "ead", "tau": 0.5, "tau_down": 0.7}, "tau-down \\(0.7\\) must be <= tau"),
    ({"mode": "small", "signal": "top1"}, "apply to modes ead, budget, hybrid"),
    ({"mode": "random", "large_share": 0.2, "tau_down": 0.1}, "apply to modes ead, budget, hybrid"),
    ({"mode": "small", "max_new_tokens": 0}, "max_new_tokens"),
    ({"mode": "ead", "tau": 0.5, "schedule": "fast"}, "schedule must be one of exact, throughput"),
    ({"mode": "large", "schedule": "throughput"}, "applies to modes ead, budget, random"),
])
def test_bad_specs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RunSpec(dataset="d", **kwargs)


def test_resume_refuses_other_settings(tmp_path, synthetic):
    dataset, outputs = synthetic
    execute_run(open_run(tmp_path, RunSpec(dataset=dataset.name, mode="small"), dataset, limit=2),
                ScriptedEngine(outputs), {}, progress=False)
    with pytest.raises(ConfigError, match="max_new_tokens=2048 -> 99.*same settings"):
        open_run(tmp_path, RunSpec(dataset=dataset.name, mode="small", max_new_tokens=99), dataset)
    state = open_run(tmp_path, RunSpec(dataset=dataset.name, mode="small"), dataset)  # a larger limit goes on
    assert [p.id for p in state.pending] == ["line-3", "line-4", "line-5"]


def test_a_manifest_older_than_the_signals_still_resumes(tmp_path, synthetic):
    """Runs made before RunSpec had `signal`, `tau_down` and `schedule` have manifests without them (as those in
    evaluation/*.tgz): the defaults stand in, so the same settings resume and another signal or schedule is
    refused."""
    dataset, outputs = synthetic
    spec = RunSpec(dataset=dataset.name, mode="ead", tau=0.5)
    execute_run(open_run(tmp_path, spec, dataset, limit=2), ScriptedEngine(outputs), {}, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["config"]["signal"], manifest["config"]["tau_down"], manifest["config"]["schedule"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    state = open_run(tmp_path, spec, dataset)
    assert [p.id for p in state.pending] == ["line-3", "line-4", "line-5"]
    rows = execute_run(state, ScriptedEngine(outputs), {}, progress=False)
    assert sorted(r["id"] for r in rows) == [f"line-{i}" for i in range(1, 6)]
    with pytest.raises(ConfigError, match="signal='entropy' -> 'top1'"):
        open_run(tmp_path, RunSpec(dataset=dataset.name, mode="ead", tau=0.5, signal="top1"), dataset)
    with pytest.raises(ConfigError, match="tau_down=None -> 0.25"):
        open_run(tmp_path, RunSpec(dataset=dataset.name, mode="ead", tau=0.5, tau_down=0.25), dataset)
    with pytest.raises(ConfigError, match="schedule='exact' -> 'throughput'"):
        open_run(tmp_path, RunSpec(dataset=dataset.name, mode="ead", tau=0.5, schedule="throughput"), dataset)


def test_read_rows_drops_a_cut_line(tmp_path):
    f = tmp_path / "results.jsonl"
    f.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "outp')
    assert [r["id"] for r in read_rows(f)] == ["a", "b"] and f.read_bytes().endswith(b"outp")
    assert [r["id"] for r in read_rows(f, repair=True)] == ["a", "b"]
    assert f.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    f.write_bytes(b'{"id": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is damaged"):
        read_rows(f)


def test_generate_rows_drives_the_engine_with_each_router(tiny_pairs):
    """Through the real engine, the trace follows the random control token for token."""
    pair = load_pair(*tiny_pairs["qwen2"], device="cpu")
    engine = Engine(pair)
    prompts = [pair.encode([{"role": "user", "content": q}]) for q in ("How many eggs?", "What is 2+3?")]
    sampling = SamplingParams(max_new_tokens=40, ignore_eos=True)
    routers = [RandomRouter(0.5, problem_seed(1, str(i)), block_tokens=4) for i in range(2)]
    results = generate_rows(engine, prompts, sampling, routers)
    for i, res in enumerate(results):
        expected = _roles(RandomRouter(0.5, problem_seed(1, str(i)), block_tokens=4), 40)
        assert [s.role for s in res.trace.steps] == expected and len(set(expected)) == 2


@pytest.mark.skipif(not hasattr(ead.engine, "BatchEngine"), reason="ead.engine has no BatchEngine yet")
def test_generate_rows_reports_each_batched_result_once_as_it_finishes(tiny_pairs):
    pair = load_pair(*tiny_pairs["qwen2"], device="cpu")
    engine = ead.engine.BatchEngine(pair, max_batch=2)  # 3 prompts, 2 slots: the third waits for a free one
    prompts = [pair.encode([{"role": "user", "content": q}]) for q in ("Eggs?", "What is 2+3?", "Tom has 5.")]
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [Engine(pair).generate(p, sampling).token_ids for p in prompts]
    seen = []
    batched = generate_rows(engine, prompts, sampling, [RunSpec(dataset="d", mode="ead", tau=0.5).make_router(str(i))
                                                        for i in range(len(prompts))],
                            on_result=lambda i, r: seen.append((i, r.token_ids, engine.has_work)))
    assert sorted(i for i, _, _ in seen) == [0, 1, 2]
    assert seen[0][2]  # the first result was saved while the third prompt still ran
    assert [r.token_ids for r in batched] == alone == [t for _, t, _ in sorted(seen)]
