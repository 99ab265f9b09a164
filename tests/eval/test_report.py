"""`ead report` on hand-made run directories whose numbers are worked out here by hand: the paper's table, the
MATH breakdown, and a Pareto plot whose points (sidecar JSON and the figure's own artists) match the rows."""

import json
from pathlib import Path

import numpy as np
import pytest

from ead.cli import main
from ead.eval.report import load_runs, pareto_figure

P_SMALL, P_LARGE = 1_000_000_000, 14_000_000_000
# name -> (mode, tau, large_share, correct per problem, (small, large) tokens per problem, seconds per problem)
RUNS = {
    "small": ("small", None, None, [1, 0, 0, 1], (100, 0), 1.0),
    "large": ("large", None, None, [1, 1, 0, 1], (0, 100), 4.0),
    "ead-tau0.5": ("ead", 0.5, None, [1, 1, 0, 0], (70, 30), 2.0),
    "ead-tau1": ("ead", 1.0, None, [1, 0, 0, 1], (90, 10), 1.0),
    "random": ("random", None, 0.3, [0, 1, 0, 1], (70, 30), 2.5),
}
LABELS = {"small": "small only", "large": "large only", "ead-tau0.5": "EAD tau=0.5", "ead-tau1": "EAD tau=1",
          "random": "random F=0.300"}


def write_run(d, config, label, dataset, rows, **extras):
    """A run directory as `ead eval` leaves it: a manifest (pair of P_SMALL and P_LARGE parameters) and rows."""
    d.mkdir(parents=True)
    manifest = {"config": config, "label": label, "dataset": dataset,
                "models": {"small": {"source": "s", "params": P_SMALL}, "large": {"source": "l", "params": P_LARGE}},
                "grader": {"name": "math-verify", "version": "0.9.0"}, **extras}
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def make_run(root, name):
    mode, tau, share, correct, (ts, tl), seconds = RUNS[name]
    rows = [{"id": f"p{i}", "correct": bool(c), "tokens_small": ts, "tokens_large": tl, "seconds": seconds,
             "finish_reason": "length" if (name == "small" and i == 3) else "stop", "level": 1 + i % 2,
             "subject": "Algebra" if i < 2 else "Geometry"} for i, c in enumerate(correct)]
    return write_run(root / name, {"mode": mode, "tau": tau, "large_share": share, "max_new_tokens": 2048},
                     LABELS[name], {"name": "math500", "sha256": "ab" * 32}, rows)


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for name in RUNS:
        make_run(root, name)
    return root


def test_table_by_hand(sweep, capsys):
    assert main(["report", str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    # cost reduction 1 - ((1-f) Ps + f Pl) / Pl: f=0.3 -> 1 - (0.7 + 4.2)/14 = 65%; f=0.1 -> 1 - 2.3/14 = 83.6%
    # Manifests without a "signal" key (runs made before the signals) are entropy runs. Every problem of a run
    # has the same share here, so the per-problem spread is 0.
    expected = [
        "| small only | – | 50.0% (2/4) | 66.7% | 0.0% | – | – | 92.9% | 4.00x | 1/4 |",
        "| large only | – | 75.0% (3/4) | 100.0% | 100.0% | – | – | 0.0% | 1.00x | 0/4 |",
        ("| EAD tau=0.5 | entropy | 50.0% (2/4) | 66.7% | 30.0% | – | 30.0% ± 0.0 [30.0, 30.0] | 65.0% | 2.00x "
         "| 0/4 |"),
        "| EAD tau=1 | entropy | 50.0% (2/4) | 66.7% | 10.0% | – | 10.0% ± 0.0 [10.0, 10.0] | 83.6% | 4.00x | 0/4 |",
        ("| random F=0.300 | – | 50.0% (2/4) | 66.7% | 30.0% | 30.0% | 30.0% ± 0.0 [30.0, 30.0] | 65.0% | 1.60x "
         "| 0/4 |"),
    ]
    table = [line for line in md.splitlines() if line.startswith("| ") and "(" in line and "/4)" in line]
    assert table == expected
    assert "\n".join(expected) in capsys.readouterr().out
    assert "math-verify 0.9.0" in md and "![accuracy vs large share](pareto.png)" in md
    html = (sweep / "report.html").read_text()
    assert html.count("<table>") == 3 and "data:image/png;base64," in html and "<td>EAD tau=0.5</td>" in html


def test_breakdown_by_level_and_subject(sweep, capsys):
    assert main(["report", str(sweep), "--out", str(sweep / "rep")]) == 0
    md = (sweep / "rep" / "report.md").read_text()
    # level 1 = problems p0, p2: small 1/2 correct, large 1/2, ead0.5 1/2; level 2 = p1, p3
    assert "| 1 | 50.0% of 2, large 0.0% | 50.0% of 2, large 100.0% | 50.0% of 2, large 30.0% |" in md
    assert "| 2 | 50.0% of 2, large 0.0% | 100.0% of 2, large 100.0% | 50.0% of 2, large 30.0% |" in md
    assert "| Geometry | 50.0% of 2, large 0.0% | 50.0% of 2, large 100.0% | 0.0% of 2, large 30.0% |" in md


def test_pareto_points_match_the_rows(sweep, capsys):
    assert main(["report", str(sweep)]) == 0
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((sweep / "pareto.json").read_text())["points"]
    got = {p["run"]: (p["mode"], p["tau"], round(p["large_share"], 9), p["accuracy"]) for p in points}
    assert got == {"small only": ("small", None, 0.0, 0.5), "large only": ("large", None, 1.0, 0.75),
                   "EAD tau=0.5": ("ead", 0.5, 0.3, 0.5), "EAD tau=1": ("ead", 1.0, 0.1, 0.5),
                   "random F=0.300": ("random", None, 0.3, 0.5)}

    # The figure's artists hold exactly these points, in percent; EAD colours are the taus.
    ax = pareto_figure(points, "t").axes[0]
    scatters = {c.get_gid(): c for c in ax.collections}
    np.testing.assert_allclose(scatters["ead-entropy"].get_offsets(), [[10, 50], [30, 50]])
    assert [t.get_text() for t in ax.texts] == ["1", "0.5"]  # each EAD point labelled with its tau
    np.testing.assert_allclose(scatters["small"].get_offsets(), [[0, 50]])
    np.testing.assert_allclose(scatters["large"].get_offsets(), [[100, 75]])
    [random_line] = [line for line in ax.lines if line.get_gid() == "random"]
    np.testing.assert_allclose(np.column_stack(random_line.get_data()), [[30, 50]])


def test_partial_runs_compare_on_shared_problems(tmp_path, capsys):
    make_run(tmp_path, "large")
    ead = make_run(tmp_path, "ead-tau0.5")
    lines = (ead / "results.jsonl").read_text().splitlines(keepends=True)
    (ead / "results.jsonl").write_text("".join(lines[:2]))  # p0, p1: both right, as large-only's are
    runs = load_runs([tmp_path / "large", ead])
    assert [r.label for r in runs] == ["large only", "EAD tau=0.5"]
    assert main(["report", str(tmp_path / "large"), str(ead), "--out", str(tmp_path / "r")]) == 0
    assert ("| EAD tau=0.5 | entropy | 100.0% (2/2) | 100.0% | 30.0% | – | 30.0% ± 0.0 [30.0, 30.0] | 65.0% | 2.00x "
            "| 0/2 |") in capsys.readouterr().out


def test_bad_report_arguments(tmp_path, sweep, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert main(["report", str(sweep / "small"), str(sweep / "large")]) == 2
    assert "--out DIR" in capsys.readouterr().err


# Several signals, a budget run, a calibrated run and a control, with shares that differ between problems.
# name -> (config, manifest extras, label, correct per problem, (small, large) tokens per problem)
SIGNAL_RUNS = {
    "large": ({"mode": "large"}, {}, "large only", [1, 1, 1, 0], [(0, 100)] * 4),
    "ead-tau0.5": ({"mode": "ead", "tau": 0.5}, {}, "EAD tau=0.5", [1, 0, 1, 0], [(70, 30)] * 4),
    "ead-varentropy-tau2": ({"mode": "ead", "tau": 2.0, "signal": "varentropy"}, {}, "EAD varentropy tau=2",
                            [1, 1, 0, 0], [(80, 20), (60, 40), (90, 10), (70, 30)]),
    "ead-top1-tau0.2": ({"mode": "ead", "tau": 0.2, "signal": "top1"}, {}, "EAD top1 tau=0.2", [1, 1, 1, 0],
                        [(60, 40)] * 4),
    "calib-top1-f0.25": ({"mode": "ead", "tau": 0.3, "signal": "top1"},
                         {"calibration": {"path": "top1.json", "signal": "top1", "tau": 0.3,
                                          "target_large_share": 0.25}},
                         "EAD top1 tau=0.3", [0, 1, 1, 0], [(80, 20)] * 4),
    "budget-f0.25": ({"mode": "budget", "tau": 0.5, "large_share": 0.25}, {}, "EAD budget 25%", [1, 1, 0, 1],
                     [(75, 25), (76, 24), (74, 26), (75, 25)]),
    "random-budget-f0.25": ({"mode": "random", "large_share": 0.25}, {"control_of": "budget-f0.25"}, "random F=0.250",
                            [0, 1, 0, 0], [(75, 25)] * 4),
}


@pytest.fixture
def signal_sweep(tmp_path):
    root = tmp_path / "signals"
    for name, (config, extras, label, correct, tokens) in SIGNAL_RUNS.items():
        rows = [{"id": f"p{i}", "correct": bool(c), "tokens_small": ts, "tokens_large": tl, "seconds": 1.0,
                 "finish_reason": "stop"} for i, (c, (ts, tl)) in enumerate(zip(correct, tokens))]
        write_run(root / name, {"max_new_tokens": 1024, "large_share": None, **config}, label,
                  {"name": "gsm8k", "sha256": "cd" * 32}, rows, **extras)
    return root


def test_signals_budget_and_calibrated_runs_in_the_table(signal_sweep, capsys):
    assert main(["report", str(signal_sweep)]) == 0
    md = (signal_sweep / "report.md").read_text()
    # varentropy: per-problem shares 0.2, 0.4, 0.1, 0.3: mean 0.25, sd sqrt((.05² + .15² + .15² + .05²) / 4) = 11.2
    # points; p10 and p90 interpolate the sorted shares at (n - 1) p = 0.3 and 2.7: 0.13 and 0.37.
    # budget: 0.25, 0.24, 0.26, 0.25: sd sqrt(2e-4 / 4) = 0.7 points, p10 0.24 + 0.3 * 0.01, p90 0.25 + 0.7 * 0.01.
    expected = [
        "| large only | – | 75.0% (3/4) | 100.0% | 100.0% | – | – | 0.0% | 1.00x | 0/4 |",
        ("| EAD tau=0.5 | entropy | 50.0% (2/4) | 66.7% | 30.0% | – | 30.0% ± 0.0 [30.0, 30.0] | 65.0% | 1.00x "
         "| 0/4 |"),
        ("| EAD varentropy tau=2 | varentropy | 50.0% (2/4) | 66.7% | 25.0% | – | 25.0% ± 11.2 [13.0, 37.0] | 69.6% "
         "| 1.00x | 0/4 |"),
        ("| EAD top1 tau=0.2 | top1 | 75.0% (3/4) | 100.0% | 40.0% | – | 40.0% ± 0.0 [40.0, 40.0] | 55.7% | 1.00x "
         "| 0/4 |"),
        ("| EAD top1 tau=0.3 (calibrated for 25%) | top1 | 50.0% (2/4) | 66.7% | 20.0% | 25.0% "
         "| 20.0% ± 0.0 [20.0, 20.0] | 74.3% | 1.00x | 0/4 |"),
        ("| EAD budget 25% | entropy | 75.0% (3/4) | 100.0% | 25.0% | 25.0% | 25.0% ± 0.7 [24.3, 25.7] | 69.6% "
         "| 1.00x | 0/4 |"),
        ("| random F=0.250 (share of budget-f0.25) | – | 25.0% (1/4) | 33.3% | 25.0% | 25.0% "
         "| 25.0% ± 0.0 [25.0, 25.0] | 69.6% | 1.00x | 0/4 |"),
    ]
    table = [line for line in md.splitlines() if line.startswith("| ") and "/4)" in line]
    assert table == expected
    assert "| run | signal | accuracy | % of large acc. | % tokens by large | target share | share per problem" in md


def test_pareto_groups_points_by_signal(signal_sweep, capsys):
    assert main(["report", str(signal_sweep)]) == 0
    assert (signal_sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((signal_sweep / "pareto.json").read_text())["points"]
    assert len(points) == len(SIGNAL_RUNS)
    for p in points:  # each point is its run's JSONL, recounted here
        rows = [json.loads(line) for line in Path(p["path"], "results.jsonl").read_text().splitlines()]
        large = sum(r["tokens_large"] for r in rows)
        assert p["large_share"] == pytest.approx(large / sum(r["tokens_small"] + r["tokens_large"] for r in rows))
        assert p["accuracy"] == sum(r["correct"] for r in rows) / len(rows) and p["n"] == len(rows)
    got = {p["run"]: (p["mode"], p["signal"], p["tau"], p["target_share"]) for p in points}
    assert got["EAD budget 25%"] == ("budget", "entropy", 0.5, 0.25)
    assert got["EAD top1 tau=0.3 (calibrated for 25%)"] == ("ead", "top1", 0.3, 0.25)
    assert got["large only"] == ("large", None, None, None)

    ax = pareto_figure(points, "t").axes[0]
    scatters = {c.get_gid(): c for c in ax.collections}
    assert set(scatters) == {"ead-entropy", "ead-varentropy", "ead-top1", "budget-entropy", "large"}
    np.testing.assert_allclose(scatters["ead-entropy"].get_offsets(), [[30, 50]])
    np.testing.assert_allclose(scatters["ead-varentropy"].get_offsets(), [[25, 50]])
    np.testing.assert_allclose(scatters["ead-top1"].get_offsets(), [[20, 50], [40, 75]])  # in order of share
    np.testing.assert_allclose(scatters["budget-entropy"].get_offsets(), [[25, 75]])
    assert len(scatters["budget-entropy"].get_facecolors()) == 0  # hollow: a budget run
    assert scatters["ead-top1"].get_facecolors()[0].tolist() != scatters["ead-entropy"].get_facecolors()[0].tolist()
    [random_line] = [line for line in ax.lines if line.get_gid() == "random"]
    np.testing.assert_allclose(np.column_stack(random_line.get_data()), [[25, 25]])
    assert "budget 25%" in [t.get_text() for t in ax.texts]


# Speed against accuracy: wall_seconds per problem differ from the batched rows' own `seconds`, and only the former
# count. gsm8k has a large-only run; math500 has none, so its runs have no speed-up and no point on the right panel.
# name -> (dataset, config, label, correct per problem, (small, large) tokens, seconds, wall_seconds per problem)
SPEED_RUNS = {
    "large": ("gsm8k", {"mode": "large"}, "large only", [1, 1, 1, 0], (0, 100), 12.0, 4.0),
    "speculative": ("gsm8k", {"mode": "speculative"}, "speculative", [1, 1, 1, 0], (0, 100), 6.0, 2.0),
    "hybrid": ("gsm8k", {"mode": "hybrid", "tau": 0.5}, "hybrid tau=0.5", [1, 1, 0, 0], (80, 20), 3.0, 1.6),
    "ead-tau1": ("gsm8k", {"mode": "ead", "tau": 1.0}, "EAD tau=1", [1, 0, 0, 0], (90, 10), 2.0, 1.0),
    "m500-small": ("math500", {"mode": "small"}, "small only", [1, 0, 0, 0], (100, 0), 1.0, 0.5),
    "m500-ead": ("math500", {"mode": "ead", "tau": 1.0}, "EAD tau=1 (MATH)", [1, 1, 0, 0], (90, 10), 2.0, 1.0),
}


@pytest.fixture
def speed_sweep(tmp_path):
    root = tmp_path / "speed"
    for name, (dataset, config, label, correct, (ts, tl), seconds, wall) in SPEED_RUNS.items():
        rows = [{"id": f"p{i}", "correct": bool(c), "tokens_small": ts, "tokens_large": tl, "seconds": seconds,
                 "wall_seconds": wall, "finish_reason": "stop"} for i, c in enumerate(correct)]
        write_run(root / name, {"max_new_tokens": 1024, "large_share": None, **config}, label,
                  {"name": dataset, "sha256": dataset[:2] * 32}, rows)
    return root


def test_speed_panel_places_speculative_by_wall_clock(speed_sweep, capsys):
    assert main(["report", str(speed_sweep), "--out", str(speed_sweep / "rep")]) == 0
    points = {}
    for stem in ("pareto-1", "pareto-2"):
        data = json.loads((speed_sweep / "rep" / f"{stem}.json").read_text())
        points[data["dataset"]["name"]] = data["points"]
    # gsm8k: large-only takes 4 x 4.0 s; speculative 4 x 2.0 -> 2x, hybrid 4 x 1.6 -> 2.5x, EAD 4 x 1.0 -> 4x.
    assert {p["run"]: p["speedup"] for p in points["gsm8k"]} == pytest.approx(
        {"large only": 1.0, "speculative": 2.0, "hybrid tau=0.5": 2.5, "EAD tau=1": 4.0})
    # math500 has no large-only run: no speed-up.
    assert all(np.isnan(p["speedup"]) for p in points["math500"]) and len(points["math500"]) == 2

    fig = pareto_figure(points["gsm8k"], "t")
    share_ax, speed_ax = fig.axes
    share = {c.get_gid(): c for c in share_ax.collections}
    np.testing.assert_allclose(share["speculative"].get_offsets(), [[100, 75]])  # on top of large only
    np.testing.assert_allclose(share["large"].get_offsets(), [[100, 75]])
    speed = {c.get_gid(): c for c in speed_ax.collections}
    assert set(speed) == {"speed-large", "speed-speculative", "speed-ead-entropy"}
    np.testing.assert_allclose(speed["speed-speculative"].get_offsets(), [[2.0, 75]])
    np.testing.assert_allclose(speed["speed-large"].get_offsets(), [[1.0, 75]])
    np.testing.assert_allclose(speed["speed-ead-entropy"].get_offsets(), [[4.0, 25]])
    lines = {line.get_gid(): line for line in speed_ax.lines}
    np.testing.assert_allclose(np.column_stack(lines["speed-hybrid"].get_data()), [[2.5, 50]])
    assert list(lines["speed-parity"].get_xdata()) == [1, 1]  # the vertical line at large only's speed
    # Same colour and marker on both panels.
    assert share["speculative"].get_facecolors().tolist() == speed["speed-speculative"].get_facecolors().tolist()
    np.testing.assert_array_equal(share["speculative"].get_paths()[0].vertices,
                                  speed["speed-speculative"].get_paths()[0].vertices)

    # No large-only run: nothing on the right panel but a note saying why.
    fig = pareto_figure(points["math500"], "t")
    share_ax, speed_ax = fig.axes
    assert {c.get_gid() for c in share_ax.collections} == {"small", "ead-entropy"}
    assert len(speed_ax.collections) == len(speed_ax.lines) == 0
    assert [t.get_gid() for t in speed_ax.texts] == ["speed-none"]
    fig.savefig(speed_sweep / "no-speed.png")  # draws without a point to scale the axis by

    md = (speed_sweep / "rep" / "report.md").read_text()
    assert md.count("measured wall-clock time") == 2  # the note, once per dataset


def test_printed_table_compares_each_dataset_with_its_own_large_only_run(speed_sweep, capsys):
    """`ead report` over two datasets prints one table each: math500's runs, which have no large-only run, get
    no speed-up rather than one against gsm8k's large-only run."""
    assert main(["report", str(speed_sweep), "--out", str(speed_sweep / "rep")]) == 0
    tables = capsys.readouterr().out.strip().split("\n\n")
    assert len(tables) == 2
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for t in tables for line in t.splitlines()[2:]}
    assert rows["speculative"][8] == "2.00x"  # gsm8k: 4 x 4.0 s of large only over 4 x 2.0 s
    small = next(cells for name, cells in rows.items() if name == "small only")
    assert small[8] == "–"
