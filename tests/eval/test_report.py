"""`ead report` on hand-made run directories whose numbers are worked out here by hand: the paper's table, the
MATH breakdown, and a Pareto plot whose points (sidecar JSON and the figure's own artists) match the rows."""

import json

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


def make_run(root, name):
    mode, tau, share, correct, (ts, tl), seconds = RUNS[name]
    d = root / name
    d.mkdir(parents=True)
    manifest = {"config": {"mode": mode, "tau": tau, "large_share": share, "max_new_tokens": 2048},
                "label": LABELS[name], "dataset": {"name": "math500", "sha256": "ab" * 32},
                "models": {"small": {"source": "s", "params": P_SMALL}, "large": {"source": "l", "params": P_LARGE}},
                "grader": {"name": "math-verify", "version": "0.9.0"}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    rows = [{"id": f"p{i}", "correct": bool(c), "tokens_small": ts, "tokens_large": tl, "seconds": seconds,
             "finish_reason": "length" if (name == "small" and i == 3) else "stop", "level": 1 + i % 2,
             "subject": "Algebra" if i < 2 else "Geometry"} for i, c in enumerate(correct)]
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


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
    expected = [
        "| small only | 50.0% (2/4) | 66.7% | 0.0% | 92.9% | 4.00x | 1/4 |",
        "| large only | 75.0% (3/4) | 100.0% | 100.0% | 0.0% | 1.00x | 0/4 |",
        "| EAD tau=0.5 | 50.0% (2/4) | 66.7% | 30.0% | 65.0% | 2.00x | 0/4 |",
        "| EAD tau=1 | 50.0% (2/4) | 66.7% | 10.0% | 83.6% | 4.00x | 0/4 |",
        "| random F=0.300 | 50.0% (2/4) | 66.7% | 30.0% | 65.0% | 1.60x | 0/4 |",
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
    np.testing.assert_allclose(scatters["ead"].get_offsets(), [[10, 50], [30, 50]])
    np.testing.assert_allclose(scatters["ead"].get_array(), [1.0, 0.5])
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
    assert "| EAD tau=0.5 | 100.0% (2/2) | 100.0% | 30.0% | 65.0% | 2.00x | 0/2 |" in capsys.readouterr().out


def test_bad_report_arguments(tmp_path, sweep, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert main(["report", str(sweep / "small"), str(sweep / "large")]) == 2
    assert "--out DIR" in capsys.readouterr().err
