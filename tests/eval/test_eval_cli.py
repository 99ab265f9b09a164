"""`ead eval`, `ead sweep` and `ead report` end to end on tiny random models: rows, modes, resuming after a
kill (between rows, inside a row, and a real kill -9), refusing a mismatched resume, and bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import ead.engine
import ead.eval.cli
import ead.eval.runs
from ead.cli import build_parser, main
from ead.errors import ConfigError
from ead.eval.cli import control_sources, sweep_plan
from ead.eval.datasets import load_dataset
from ead.eval.grading import grade
from ead.routing import BudgetRouter, SignalRouter

from conftest import DATA

LIMIT, TOKENS = 8, 24


@pytest.fixture(scope="module")
def models(tiny_pairs):
    small, large = tiny_pairs["qwen2"]
    return ["--small", small, "--large", large, "--device", "cpu"]


def eval_args(models, out, *extra):
    return ["eval", "--dataset", "gsm8k", "--max-new-tokens", str(TOKENS), "--no-progress", *models,
            "--out", str(out), *extra]


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def same(rows):
    """Rows without their timings, in id order (a batch engine saves rows in the order they finish)."""
    return sorted(({k: v for k, v in r.items() if k not in ("seconds", "wall_seconds")} for r in rows),
                  key=lambda r: r["id"])


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """An uninterrupted EAD run of the first LIMIT problems."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(eval_args(models, out, "--limit", str(LIMIT), "--tau", "0.5")) == 0
    return out


def test_eval_writes_a_graded_row_per_problem(reference, capsys):
    rows = rows_of(reference)
    assert sorted(r["id"] for r in rows) == [f"gsm8k-{i:04d}" for i in range(LIMIT)]  # each once
    for r in rows:
        assert grade(r["output"], r["gold"], "gsm8k") == (r["answer"], r["correct"])
        n = r["tokens_small"] + r["tokens_large"]
        if r["prompt_tokens"] >= 256:  # the tiny models' context: nothing generated, the row still written
            assert (n, r["finish_reason"], r["output"], r["correct"]) == (0, "prompt_too_long", "", False)
            continue
        assert 0 < n <= TOKENS and r["large_share"] == r["tokens_large"] / n
        assert r["finish_reason"] in ("stop", "length") and r["seconds"] > 0
    first = next(r for r in rows if r["id"] == "gsm8k-0000")
    assert first["gold"] == "18" and first["prompt"].endswith("final answer within \\boxed{}.")
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["config"]["tau"] == 0.5 and manifest["config"]["max_new_tokens"] == TOKENS
    assert set(manifest["models"]["small"]["sha256"]) >= {"config.json", "model.safetensors"}


def test_resume_after_a_kill_between_rows(reference, models, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:2]))
    assert main(eval_args(models, out, "--limit", str(LIMIT), "--tau", "0.5")) == 0
    assert same(rows_of(out)) == same(rows_of(reference))
    assert rows_of(out)[:2] == rows_of(reference)[:2]  # finished rows are kept, not redone


def test_resume_after_a_kill_inside_a_row(reference, models, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    assert main(eval_args(models, out, "--limit", str(LIMIT), "--tau", "0.5")) == 0
    assert (out / "results.jsonl").read_bytes().endswith(b"}\n")
    assert same(rows_of(out)) == same(rows_of(reference))


def test_a_finished_run_prints_its_summary_and_loads_nothing(reference, models, monkeypatch, capsys):
    before = (reference / "results.jsonl").read_bytes()
    monkeypatch.setattr(ead.eval.cli, "load", lambda args: pytest.fail("a finished run loaded the models"))
    assert main(eval_args(models, reference, "--limit", str(LIMIT), "--tau", "0.5")) == 0
    out, err = capsys.readouterr()
    correct = sum(r["correct"] for r in rows_of(reference))
    assert "nothing to run" in err and f"({correct}/{LIMIT})" in out and "EAD tau=0.5" in out
    assert (reference / "results.jsonl").read_bytes() == before


def test_a_resume_with_other_settings_is_refused(reference, models, capsys):
    assert main(eval_args(models, reference, "--limit", str(LIMIT), "--tau", "1.0")) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "tau=0.5 -> 1.0" in err and "new --out" in err


def test_resume_after_kill_9(reference, models, tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "ead.cli", *eval_args(models, out, "--limit", str(LIMIT),
                                                                         "--tau", "0.5")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results, deadline = out / "results.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and results.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = results.read_bytes().count(b"\n")
    assert 2 <= done < LIMIT, f"the run was not killed midway ({done} rows)"
    assert main(eval_args(models, out, "--limit", str(LIMIT), "--tau", "0.5")) == 0
    assert same(rows_of(out)) == same(rows_of(reference))


def test_small_large_and_random_modes(reference, models, tmp_path, capsys):
    runs = {}
    for mode, extra in (("small", []), ("large", []), ("random", ["--large-share-from", str(reference)])):
        runs[mode] = tmp_path / mode
        assert main(eval_args(models, runs[mode], "--limit", "3", "--mode", mode, *extra)) == 0
    assert all(r["tokens_large"] == 0 for r in rows_of(runs["small"]))
    assert all(r["tokens_small"] == 0 and r["switches"] == 0 for r in rows_of(runs["large"]))
    ref = rows_of(reference)
    f = sum(r["tokens_large"] for r in ref) / sum(r["tokens_large"] + r["tokens_small"] for r in ref)
    assert json.loads((runs["random"] / "manifest.json").read_text())["config"]["large_share"] == f


def test_a_synthetic_dataset_graded_right(models, tmp_path, capsys):
    """Golds set to what the grader extracts from the tiny model's greedy outputs make those rows correct."""
    questions = ["What is 3 + 4?", "Tom has 5 apples and eats 2. How many are left?", "Double 21."]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "#### 0.123"}) + "\n" for q in questions))
    args = ["--dataset", str(data), "--mode", "small", "--max-new-tokens", "40", "--no-progress", *models]
    assert main(["eval", *args, "--out", str(tmp_path / "a")]) == 0
    answers = [r["answer"] for r in rows_of(tmp_path / "a")]
    data.write_text("".join(json.dumps({"question": q, "answer": a or "no answer"}) + "\n"
                            for q, a in zip(questions, answers)))
    assert main(["eval", *args, "--out", str(tmp_path / "b")]) == 0
    assert [r["correct"] for r in rows_of(tmp_path / "b")] == [a is not None for a in answers]
    assert any(a is not None for a in answers)


def test_batch_flag(reference, models, tmp_path, capsys):
    assert main(eval_args(models, tmp_path / "run", "--limit", "6", "--tau", "0.5", "--batch", "3")) == 0
    if not hasattr(ead.engine, "BatchEngine"):
        assert "one problem at a time" in capsys.readouterr().err
    # Greedy: each problem's row is the one it gets alone, whatever ran beside it.
    assert same(rows_of(tmp_path / "run")) == [r for r in same(rows_of(reference)) if r["id"] < "gsm8k-0006"]


def test_schedule_flag_is_kept_in_the_manifest_and_checked_on_resume(models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_args(models, out, "--limit", "3", "--tau", "0.5", "--batch", "3", "--schedule", "throughput")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["schedule"] == "throughput" and manifest["label"] == "EAD tau=0.5, throughput schedule"
    assert len(rows_of(out)) == 3
    capsys.readouterr()
    assert main(eval_args(models, out, "--limit", "4", "--tau", "0.5", "--batch", "3")) == 2  # exact: refused
    assert "schedule='throughput' -> 'exact'" in capsys.readouterr().err


def test_sweep_then_report(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "gsm8k", "--taus", "0.5,9", "--random-shares-from-ead", "--limit", "2",
            "--max-new-tokens", "16", "--no-progress", *models, "--out", str(out)]
    assert main(argv) == 0
    names = ["small", "large", "ead-tau0.5", "ead-tau9", "random-tau0.5", "random-tau9"]
    assert json.loads((out / "sweep.json").read_text())["runs"] == names
    assert all(len(rows_of(out / n)) == 2 for n in names)
    for tau in ("0.5", "9"):
        ead_rows = rows_of(out / f"ead-tau{tau}")
        f = sum(r["tokens_large"] for r in ead_rows) / sum(r["tokens_large"] + r["tokens_small"] for r in ead_rows)
        manifest = json.loads((out / f"random-tau{tau}" / "manifest.json").read_text())
        assert manifest["config"]["large_share"] == f and manifest["control_of"] == f"ead-tau{tau}"
    assert all(r["tokens_large"] == 0 for r in rows_of(out / "random-tau9"))  # 9 bits > log2(384): never large
    assert "random F=" in capsys.readouterr().out

    monkeypatch.setattr(ead.eval.cli, "load", lambda args: pytest.fail("a finished sweep loaded the models"))
    assert main(argv) == 0 and capsys.readouterr().err.count("nothing to run") == 6
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "<img" in (out / "report.html").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--dataset", "gsm9k"], "DatasetError: unknown dataset 'gsm9k'"),
    (["--dataset", "gsm8k", "--mode", "random"], "ConfigError: mode 'random' needs the large model's share"),
    (["--dataset", "gsm8k", "--mode", "random", "--large-share", "2"], "large share must be in [0, 1]"),
    (["--dataset", "gsm8k", "--limit", "0"], "--limit must be >= 1"),
])
def test_bad_input_is_one_line(models, tmp_path, capsys, extra, message):
    assert main(["eval", *extra, *models, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_file_missing_a_key_names_the_line(models, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "solution": "2"}\n')
    assert main(["eval", "--dataset", str(data), *models, "--out", str(tmp_path / "x")]) == 2
    assert "line 2 lacks a non-empty 'answer'" in capsys.readouterr().err


def test_data_dir_from_the_environment(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EAD_DATA_DIR", str(tmp_path))
    assert main(["eval", "--dataset", "math500", *models, "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path}/math500_test.jsonl does not exist" in capsys.readouterr().err


def test_sweep_with_speculative_and_hybrid_runs(models, tmp_path, capsys):
    """Speculative runs write the large-only run's outputs (greedy, float32 on CPU: exactly), which the sweep
    checks and records; hybrid runs route like EAD and write their large segments by speculation."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "gsm8k", "--taus", "6.5", "--speculative", "--hybrid-taus", "6.5", "--limit", "3",
            "--max-new-tokens", "16", "--no-progress", *models, "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["runs"] == ["small", "large", "ead-tau6.5", "speculative", "hybrid-tau6.5"]
    assert summary["speculative_vs_large"] == {"problems": 3, "different_output": 0, "different_correct": 0}
    assert same(rows_of(out / "speculative")) != [] and \
        [r["output"] for r in same(rows_of(out / "speculative"))] == [r["output"] for r in same(rows_of(out / "large"))]
    hybrid = rows_of(out / "hybrid-tau6.5")
    assert all(r["tokens_large"] + r["tokens_small"] > 0 for r in hybrid if r["finish_reason"] != "prompt_too_long")
    assert "hybrid tau=6.5" in capsys.readouterr().out
    manifest = json.loads((out / "speculative" / "manifest.json").read_text())
    assert manifest["config"]["mode"] == "speculative"


def test_hybrid_validates_its_tau(models, tmp_path, capsys):
    code = main(["eval", "--dataset", "gsm8k", "--mode", "hybrid", "--tau", "nan", *models, "--out",
                 str(tmp_path / "x")])
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_eval_takes_tau_from_a_calibration_file_and_refuses_another_pairs(models, tiny_pairs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tom has 3 apples and buys 5 more.\n")
    for arch in ("qwen2", "llama"):
        small, large = tiny_pairs[arch]
        assert main(["calibrate", "--small", small, "--large", large, "--device", "cpu", "--large-share", "0.3",
                     "--data", str(prompts), "--limit", "1", "--max-new-tokens", "8",
                     "--out", str(tmp_path / f"{arch}.json")]) == 0
    tau = json.loads((tmp_path / "qwen2.json").read_text())["tau"]
    assert main(eval_args(models, tmp_path / "ok", "--limit", "1", "--calibration", str(tmp_path / "qwen2.json"))) == 0
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["config"]["tau"] == tau
    capsys.readouterr()
    code = main(eval_args(models, tmp_path / "no", "--limit", "1", "--calibration", str(tmp_path / "llama.json")))
    assert code == 2 and "ConfigError" in capsys.readouterr().err


# ---- routing signals, hysteresis, budget mode and calibration files ----

@pytest.fixture
def routers_seen(monkeypatch):
    """The routers each run hands the engine, as they are before the first token."""
    seen = []
    real = ead.eval.runs.generate_rows

    def spy(engine, prompts, sampling, routers, on_result=None):
        seen.extend((type(r), r.cfg.signal, r.threshold_up, r.threshold_down, getattr(r, "target", None))
                    for r in routers)
        return real(engine, prompts, sampling, routers, on_result)

    monkeypatch.setattr(ead.eval.runs, "generate_rows", spy)
    return seen


@pytest.mark.parametrize("extra,router,label", [
    (["--tau", "0.5"], (SignalRouter, "entropy", 0.5, 0.5, None), "EAD tau=0.5"),
    (["--signal", "varentropy", "--tau", "0.8"], (SignalRouter, "varentropy", 0.8, 0.8, None),
     "EAD varentropy tau=0.8"),
    (["--signal", "top1", "--tau", "0.4", "--tau-down", "0.2"], (SignalRouter, "top1", 0.4, 0.2, None),
     "EAD top1 tau=0.4/0.2 (hysteresis)"),
    (["--signal", "margin", "--tau", "0.9"], (SignalRouter, "margin", 0.9, 0.9, None), "EAD margin tau=0.9"),
    (["--mode", "budget", "--large-share", "0.25"], (BudgetRouter, "entropy", 0.5, 0.5, 0.25), "EAD budget 25%"),
    (["--mode", "budget", "--signal", "top1", "--tau", "0.3", "--large-share", "0.1"],
     (BudgetRouter, "top1", 0.3, 0.3, 0.1), "EAD top1 budget 10%"),
])
def test_eval_routes_on_each_signal_and_budget(models, tmp_path, routers_seen, capsys, extra, router, label):
    out = tmp_path / "run"
    assert main(eval_args(models, out, "--limit", "2", "--max-new-tokens", "12", *extra)) == 0
    assert len(routers_seen) == 2
    for kind, name, up, down, target in routers_seen:
        assert (kind, name, target) == router[:2] + router[4:]
        assert (up, down) == pytest.approx(router[2:4])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label"] == label and manifest["config"]["signal"] == router[1]
    assert label in capsys.readouterr().out
    for r in rows_of(out):
        n = r["tokens_small"] + r["tokens_large"]
        assert r["large_share"] == r["tokens_large"] / n
        assert ("tau_final" in r) == (router[0] is BudgetRouter)  # where the controller left tau


@pytest.fixture(scope="module")
def calibrations(tiny_pairs, tmp_path_factory):
    """`ead calibrate` files for the qwen2 tiny pair: varentropy at a 0.3 share and entropy at 0.2."""
    root = tmp_path_factory.mktemp("cal")
    prompts = root / "prompts.txt"
    prompts.write_text("Tom has 3 apples and buys 5 more.\n")
    small, large = tiny_pairs["qwen2"]
    assert main(["calibrate", "--small", small, "--large", large, "--device", "cpu", "--large-share", "0.2,0.3",
                 "--signal", "varentropy,entropy", "--data", str(prompts), "--limit", "1", "--max-new-tokens", "8",
                 "--out-dir", str(root)]) == 0
    return {"varentropy": root / "varentropy-f0.3.json", "entropy": root / "entropy-f0.2.json"}


def test_a_calibration_file_sets_the_runs_signal_and_tau(models, calibrations, tmp_path, routers_seen, capsys):
    cal = json.loads(calibrations["varentropy"].read_text())
    out = tmp_path / "run"
    assert main(eval_args(models, out, "--limit", "1", "--calibration", str(calibrations["varentropy"]))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["config"]["signal"], manifest["config"]["tau"]) == ("varentropy", cal["tau"])
    assert manifest["calibration"]["target_large_share"] == 0.3
    assert routers_seen[0][:3] == (SignalRouter, "varentropy", cal["tau"])
    assert "(calibrated for 30%)" in capsys.readouterr().out
    # An explicit --signal that agrees is fine (and resumes the same run); budget mode starts from the file's tau.
    assert main(eval_args(models, out, "--limit", "1", "--signal", "varentropy", "--calibration",
                          str(calibrations["varentropy"]))) == 0
    assert main(eval_args(models, tmp_path / "budget", "--limit", "1", "--mode", "budget", "--large-share", "0.3",
                          "--calibration", str(calibrations["varentropy"]))) == 0
    assert routers_seen[-1] == (BudgetRouter, "varentropy", cal["tau"], cal["tau"], 0.3)


def test_a_calibration_for_another_signal_or_window_is_refused_before_loading(models, calibrations, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.setattr(ead.eval.cli, "load", lambda args: pytest.fail("a refused run loaded the models"))
    parser = build_parser()
    args = parser.parse_args(eval_args(models, tmp_path / "x", "--signal", "top1", "--calibration",
                                       str(calibrations["varentropy"])))
    with pytest.raises(ConfigError, match="holds a tau for signal 'varentropy', but --signal top1 was given; drop "
                                          "--signal .* or make a top1 calibration with `ead calibrate --signal top1"):
        args.handler(args)
    args = parser.parse_args(eval_args(models, tmp_path / "x", "--window", "3", "--calibration",
                                       str(calibrations["varentropy"])))
    with pytest.raises(ConfigError, match="calibrated with --window 5, but this run has --window 3; pass --window 5"):
        args.handler(args)
    assert main(eval_args(models, tmp_path / "x", "--mode", "random", "--large-share", "0.2", "--calibration",
                          str(calibrations["varentropy"]))) == 2
    assert "does not use; pass --mode ead, budget, hybrid" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_signal_flags_on_a_mode_without_routing_are_refused(models, tmp_path, capsys):
    assert main(eval_args(models, tmp_path / "x", "--mode", "small", "--signal", "top1")) == 2
    assert "--signal and --tau-down apply to modes ead, budget, hybrid" in capsys.readouterr().err


def fake_calibration(path, signal, share, tau=0.5, window=5):
    path.write_text(json.dumps({"tau": tau, "target_large_share": share, "pair": {}, "settings": {
        "signal": signal, "window_tokens": window, "min_dwell_tokens": 10, "start": "small"}}))
    return str(path)


def test_sweep_plan_names(tmp_path, monkeypatch):
    monkeypatch.setenv("EAD_DATA_DIR", str(DATA))
    top1 = fake_calibration(tmp_path / "a.json", "top1", 0.25, tau=0.3)
    entropy = fake_calibration(tmp_path / "b.json", "entropy", 0.1, tau=1.5)
    argv = ["sweep", "--dataset", "gsm8k", "--out", str(tmp_path / "s"), "--signal", "varentropy", "--taus", "0.8,1.2",
            "--budget-shares", "0.1,0.25", "--calibrations", f"{top1},{entropy}", "--hybrid-taus", "0.8"]
    args = build_parser().parse_args(argv)
    dataset = load_dataset("gsm8k", DATA)
    plan, notes, checks = sweep_plan(args, dataset)
    assert [(n, s.mode, s.signal, s.tau, s.large_share) for n, s in plan] == [
        ("small", "small", "entropy", None, None), ("large", "large", "entropy", None, None),
        ("ead-varentropy-tau0.8", "ead", "varentropy", 0.8, None),
        ("ead-varentropy-tau1.2", "ead", "varentropy", 1.2, None),
        ("budget-varentropy-f0.1", "budget", "varentropy", 0.5, 0.1),
        ("budget-varentropy-f0.25", "budget", "varentropy", 0.5, 0.25),
        ("calib-top1-f0.25", "ead", "top1", 0.3, None), ("calib-entropy-f0.1", "ead", "entropy", 1.5, None),
        ("hybrid-varentropy-tau0.8", "hybrid", "varentropy", 0.8, None)]
    assert notes["calib-top1-f0.25"]["calibration"]["path"] == top1 and [c[0] for c in checks] == [top1, entropy]
    assert control_sources(args, plan) == []
    pick = build_parser().parse_args(argv + ["--random-shares-from-ead"])
    assert control_sources(pick, plan) == ["ead-varentropy-tau0.8", "ead-varentropy-tau1.2", "budget-varentropy-f0.1",
                                           "budget-varentropy-f0.25", "calib-top1-f0.25", "calib-entropy-f0.1"]
    pick = build_parser().parse_args(argv + ["--random-taus", "1.2", "--random-from",
                                             "calib-top1-f0.25,hybrid-varentropy-tau0.8"])
    assert control_sources(pick, plan) == ["ead-varentropy-tau1.2", "calib-top1-f0.25", "hybrid-varentropy-tau0.8"]
    # The entropy names are the ones older sweeps used, so those directories resume.
    old = build_parser().parse_args(["sweep", "--dataset", "gsm8k", "--out", "x", "--taus", "0.5", "--budget-shares",
                                     "0.25"])
    assert [n for n, _ in sweep_plan(old, dataset)[0]] == ["small", "large", "ead-tau0.5", "budget-f0.25"]


@pytest.mark.parametrize("extra,match", [
    (["--calibrations", "A,A"], "both top1 calibrations for a 0.25 share, so both runs would be calib-top1-f0.25"),
    (["--taus", "0.5", "--random-from", "ead-tau0.7"],
     "--random-from \\['ead-tau0.7'\\]: no such EAD run in this sweep; choose among ead-tau0.5"),
    (["--taus", "0.5", "--random-taus", "0.7"], "--random-taus \\[0.7\\] are not among --taus"),
    (["--taus", "0.5,0.5"], "would run ead-tau0.5 twice"),
    (["--calibrations", "W"], "calibrated with --window 3, but this run has --window 5"),
])
def test_bad_sweep_plans(tmp_path, monkeypatch, extra, match):
    monkeypatch.setenv("EAD_DATA_DIR", str(DATA))
    a = fake_calibration(tmp_path / "a.json", "top1", 0.25)
    w = fake_calibration(tmp_path / "w.json", "top1", 0.25, window=3)
    extra = [x.replace("A", a).replace("W", w) if x.startswith(("A", "W")) else x for x in extra]
    args = build_parser().parse_args(["sweep", "--dataset", "gsm8k", "--out", str(tmp_path / "s"), *extra])
    with pytest.raises(ConfigError, match=match):
        args.handler(args)


def test_sweep_over_signals_budget_and_calibrations(models, calibrations, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "gsm8k", "--signal", "top1", "--taus", "0.5", "--budget-shares", "0.25",
            "--calibrations", f"{calibrations['varentropy']},{calibrations['entropy']}", "--random-shares-from-ead",
            "--limit", "2", "--max-new-tokens", "12", "--no-progress", *models, "--out", str(out)]
    assert main(argv) == 0
    names = ["small", "large", "ead-top1-tau0.5", "budget-top1-f0.25", "calib-varentropy-f0.3", "calib-entropy-f0.2",
             "random-top1-tau0.5", "random-budget-top1-f0.25", "random-calib-varentropy-f0.3",
             "random-calib-entropy-f0.2"]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["runs"] == names and summary["budget_shares"] == [0.25] and summary["signal"] == "top1"
    assert all(len(rows_of(out / n)) == 2 for n in names)
    for source in names[2:6]:
        control = json.loads((out / f"random-{source.removeprefix('ead-')}" / "manifest.json").read_text())
        rows = rows_of(out / source)
        f = sum(r["tokens_large"] for r in rows) / sum(r["tokens_large"] + r["tokens_small"] for r in rows)
        assert control["control_of"] == source and control["config"]["large_share"] == f
    cal = json.loads((out / "calib-varentropy-f0.3" / "manifest.json").read_text())
    assert cal["config"]["signal"] == "varentropy" and cal["calibration"]["path"] == str(calibrations["varentropy"])

    monkeypatch.setattr(ead.eval.cli, "load", lambda args: pytest.fail("a finished sweep loaded the models"))
    assert main(argv) == 0 and capsys.readouterr().err.count("nothing to run") == len(names)
    assert main(["report", str(out)]) == 0
    points = json.loads((out / "pareto.json").read_text())["points"]
    assert {p["signal"] for p in points} == {None, "entropy", "varentropy", "top1"}
    assert "EAD top1 budget 25%" in (out / "report.md").read_text()
