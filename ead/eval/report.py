"""Reports over finished (or partial) run directories: the paper's table per dataset, the Pareto plot of
accuracy against large share and against wall-clock speed-up, and for MATH a breakdown by level and subject, as
report.md and report.html.

Everything shown is read back from each run's results.jsonl and manifest.json; the plotted points are also
written to pareto.json so a reader (or a test) can check the figure against the rows.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ead.errors import ConfigError
from ead.eval.runs import MANIFEST, RESULTS, ROUTED_MODES, overall_large_share, read_rows
from ead.metrics import cost_ratio
from ead.routing import SIGNALS

MODE_ORDER = {"small": 0, "large": 1, "ead": 2, "budget": 3, "random": 4, "speculative": 5, "hybrid": 6}
# One colour and marker per routing signal in the Pareto plot; budget runs are the same marker, hollow.
SIGNAL_STYLE = {"entropy": ("tab:blue", "o"), "varentropy": ("tab:olive", "^"), "top1": ("tab:brown", "v"),
                "margin": ("tab:cyan", "p")}


@dataclass
class Run:
    path: Path
    manifest: dict
    rows: list[dict]

    @property
    def mode(self) -> str:
        return self.manifest["config"]["mode"]

    @property
    def tau(self) -> float | None:
        tau = self.manifest["config"].get("tau")
        return float(tau) if tau is not None else None

    @property
    def signal(self) -> str | None:
        """The routing signal of an ead, budget or hybrid run (entropy in manifests older than the signals);
        None for a run that reads none."""
        return self.manifest["config"].get("signal", "entropy") if self.mode in ROUTED_MODES else None

    @property
    def target_share(self) -> float | None:
        """The large share the run aimed at: budget mode's target, the random control's F, or the target a
        calibrated run's tau was chosen for; None for the others."""
        if self.mode in ("budget", "random"):
            return float(self.manifest["config"]["large_share"])
        return (self.manifest.get("calibration") or {}).get("target_large_share")

    @property
    def label(self) -> str:
        label = self.manifest.get("label") or self.path.name
        if self.manifest.get("calibration"):
            label += f" (calibrated for {100 * self.target_share:.4g}%)"
        return f"{label} (share of {self.manifest['control_of']})" if self.manifest.get("control_of") else label


def load_runs(paths: list[Path]) -> list[Run]:
    """Each path is a run directory, or a sweep directory whose subdirectories are runs."""
    runs = []
    for path in map(Path, paths):
        dirs = [path] if (path / MANIFEST).is_file() else sorted(p.parent for p in path.glob(f"*/{MANIFEST}"))
        if not dirs:
            raise ConfigError(f"{path} holds no {MANIFEST}; pass run directories made by 'ead eval' or a sweep "
                              "directory made by 'ead sweep'")
        runs += [Run(d, json.loads((d / MANIFEST).read_text()), read_rows(d / RESULTS)) for d in dirs]
    signals = list(SIGNALS)
    return sorted(runs, key=lambda r: (MODE_ORDER[r.mode], signals.index(r.signal) if r.signal else 0,
                                       r.tau if r.tau is not None else 0.0, overall_large_share(r.rows), r.label))


def accuracy(rows: list[dict]) -> float:
    return sum(r["correct"] for r in rows) / len(rows) if rows else math.nan


def share_spread(rows: list[dict]) -> dict:
    """How the large share varies between problems: mean, standard deviation (over the problems, not a sample
    estimate) and the 10th and 90th percentiles of each problem's own share. Problems with no generated token
    have no share and are left out; all NaN when none is left."""
    xs = [r["tokens_large"] / (r["tokens_small"] + r["tokens_large"]) for r in rows
          if r["tokens_small"] + r["tokens_large"] > 0]
    if not xs:
        return {"mean": math.nan, "sd": math.nan, "p10": math.nan, "p90": math.nan}
    deciles = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"mean": statistics.mean(xs), "sd": statistics.pstdev(xs), "p10": deciles[0], "p90": deciles[-1]}


def summarize_run(run: Run, large: Run | None) -> dict:
    """The paper's numbers for one run. `kept` and `speedup` (wall-clock time of the large-only run over this
    run's) compare with the large-only run on the problems both finished; `cost_reduction` is
    1 - ((1-f) P_small + f P_large) / P_large with the token-weighted f; `per_problem` the share's spread
    between problems (share_spread), for runs that route."""
    rows, f = run.rows, overall_large_share(run.rows)
    models = run.manifest.get("models") or {}
    p_small, p_large = (models.get(k, {}).get("params") for k in ("small", "large"))
    routes = run.mode in ROUTED_MODES or run.mode == "random"
    out = {"run": run.label, "mode": run.mode, "signal": run.signal, "tau": run.tau, "n": len(rows),
           "correct": sum(r["correct"] for r in rows), "accuracy": accuracy(rows), "large_share": f,
           "target_share": run.target_share, "per_problem": share_spread(rows) if routes else None,
           "cost_reduction": 1 - cost_ratio(f, p_small, p_large) if p_small and p_large else math.nan,
           "cut": sum(r["finish_reason"] == "length" for r in rows), "kept": math.nan,
           "speedup": wall_speedup(run, large)}
    mine, ref = _paired_rows(run, large)
    if mine and accuracy(ref) > 0:
        out["kept"] = accuracy(mine) / accuracy(ref)
    return out


def large_only(runs: list[Run]) -> Run | None:
    """The run every other run of a dataset is compared with: its large-only run, if it has one."""
    return next((r for r in runs if r.mode == "large"), None)


def _paired_rows(run: Run, large: Run | None) -> tuple[list[dict], list[dict]]:
    """This run's rows on the problems the large-only run also finished, and the large-only run's rows for the
    same problems in the same order; both empty without a large-only run."""
    if large is None:
        return [], []
    theirs = {r["id"]: r for r in large.rows}
    mine = [r for r in run.rows if r["id"] in theirs]
    return mine, [theirs[r["id"]] for r in mine]


def wall_speedup(run: Run, large: Run | None) -> float:
    """Wall-clock seconds of the large-only run over this run's, on the problems both finished (x, > 1 is
    faster); NaN without a large-only run, a shared problem or any time spent."""
    mine, ref = _paired_rows(run, large)
    seconds = sum(_wall(r) for r in mine)
    return sum(_wall(r) for r in ref) / seconds if mine and seconds > 0 else math.nan


def _wall(row: dict) -> float:
    """A row's share of its run's wall-clock time (batched rows overlap, so their own `seconds` do not add up)."""
    return row.get("wall_seconds", row["seconds"])


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}%"


def results_table(runs: list[Run]) -> tuple[list[str], list[list[str]], list[dict]]:
    large = large_only(runs)
    stats = [summarize_run(r, large) for r in runs]
    head = ["run", "signal", "accuracy", "% of large acc.", "% tokens by large", "target share",
            "share per problem: mean ± sd [p10, p90]", "cost reduction", "wall-clock speed-up", "cut answers"]
    body = [[s["run"], s["signal"] or "–", f"{_pct(s['accuracy'])} ({s['correct']}/{s['n']})", _pct(s["kept"]),
             _pct(s["large_share"]), "–" if s["target_share"] is None else _pct(s["target_share"]),
             _spread(s["per_problem"]), _pct(s["cost_reduction"]),
             "–" if math.isnan(s["speedup"]) else f"{s['speedup']:.2f}x", f"{s['cut']}/{s['n']}"] for s in stats]
    return head, body, stats


def _spread(d: dict | None) -> str:
    if d is None or math.isnan(d["mean"]):
        return "–"
    return f"{_pct(d['mean'])} ± {100 * d['sd']:.1f} [{100 * d['p10']:.1f}, {100 * d['p90']:.1f}]"


def breakdown_table(runs: list[Run], key: str) -> tuple[list[str], list[list[str]]] | None:
    """Accuracy (and large share) per MATH level or subject, one column per run; None without that key."""
    groups = sorted({r[key] for run in runs for r in run.rows if key in r}, key=str)
    if not groups:
        return None
    body = []
    for g in groups:
        cells = []
        for run in runs:
            rows = [r for r in run.rows if r.get(key) == g]
            cells.append(f"{_pct(accuracy(rows))} of {len(rows)}, large {_pct(overall_large_share(rows))}"
                         if rows else "–")
        body.append([str(g), *cells])
    return [key, *[r.label for r in runs]], body


def pareto_points(runs: list[Run]) -> list[dict]:
    """One point per run: the large model's token share, accuracy (both fractions) and the wall-clock speed-up
    over the large-only run of `runs` (wall_speedup; NaN without one); with the run's signal, tau (budget mode:
    its start), hysteresis tau_down and target share where it has them."""
    large = large_only(runs)
    return [{"run": r.label, "path": str(r.path), "mode": r.mode, "signal": r.signal, "tau": r.tau,
             "tau_down": r.manifest["config"].get("tau_down"), "target_share": r.target_share, "n": len(r.rows),
             "large_share": overall_large_share(r.rows), "accuracy": accuracy(r.rows),
             "speedup": wall_speedup(r, large)} for r in runs if r.rows]


def pareto_figure(points: list[dict], title: str):
    """Two panels, accuracy against the large share (left) and against wall-clock speed-up over large only
    (right, only the points that have one; speculative decoding writes every token with the large model, so only
    here does its speed show). One colour and marker per routing signal (static-tau EAD runs joined in order of
    share and labelled with their tau, budget runs hollow and labelled with their target), the random control as
    a dashed curve, small and large as single markers. Each artist's gid says what it holds ("ead-<signal>",
    "budget-<signal>", "random", "hybrid", "small", ...; "speed-" before it on the right), so the plotted data
    can be read back."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.8), dpi=110, layout="constrained")
    share_ax, speed_ax = fig.subplots(1, 2)
    _draw_modes(share_ax, points, lambda p: 100 * p["large_share"])
    share_ax.set_xlabel("tokens written by the large model (%)")
    share_ax.set_title(title)
    share_ax.legend(loc="lower right", fontsize=8)

    timed = [p for p in points if not math.isnan(p.get("speedup", math.nan))]
    if timed:
        speed_ax.axvline(1, color="tab:gray", linestyle=":", zorder=0, gid="speed-parity")
        _draw_modes(speed_ax, timed, lambda p: p["speedup"], gid_prefix="speed-")
    else:
        speed_ax.text(0.5, 0.5, "no large-only run of this dataset: no speed-up to plot", ha="center",
                      va="center", transform=speed_ax.transAxes, gid="speed-none")
        speed_ax.set_xticks([])
        speed_ax.set_yticks([])
    speed_ax.set_xlabel("speed-up over large only (wall clock, x)")
    speed_ax.set_title("accuracy vs wall-clock speed-up")
    for ax in (share_ax, speed_ax):
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    return fig


def _draw_modes(ax, points: list[dict], x_of: Callable[[dict], float], gid_prefix: str = "") -> None:
    """Every mode's points on one panel at (x_of(point), accuracy in %), each series in order of large share."""

    def group(mode: str, signal: str | None = None) -> tuple[list[dict], list[float], list[float]]:
        ps = sorted((p for p in points if p["mode"] == mode and (signal is None or p["signal"] == signal)),
                    key=lambda p: p["large_share"])
        return ps, [x_of(p) for p in ps], [100 * p["accuracy"] for p in ps]

    _, x, y = group("random")
    if x:
        ax.plot(x, y, "X--", color="tab:gray", label="random control", gid=f"{gid_prefix}random", zorder=2)
    for signal, (color, marker) in SIGNAL_STYLE.items():
        ps, x, y = group("ead", signal)
        if ps:
            ax.plot(x, y, "-", color=color, alpha=0.35, zorder=1)
            ax.scatter(x, y, marker=marker, color=color, s=60, edgecolors="black", linewidths=0.5, zorder=3,
                       label=f"EAD {signal}", gid=f"{gid_prefix}ead-{signal}")
            for p, xi, yi in zip(ps, x, y):
                ax.annotate(f"{p['tau']:.3g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
        ps, x, y = group("budget", signal)
        if ps:
            ax.scatter(x, y, marker=marker, facecolors="none", edgecolors=color, linewidths=2, s=130, zorder=4,
                       label=f"EAD {signal} budget", gid=f"{gid_prefix}budget-{signal}")
            for p, xi, yi in zip(ps, x, y):
                ax.annotate(f"budget {100 * p['target_share']:.3g}%", (xi, yi), textcoords="offset points",
                            xytext=(5, -10), fontsize=7, color=color)
    ps, x, y = group("hybrid")
    if x:
        ax.plot(x, y, "D-", color="tab:green", label="hybrid (EAD + speculation)", gid=f"{gid_prefix}hybrid",
                zorder=4)
        for p, xi, yi in zip(ps, x, y):
            ax.annotate(f"{p['tau']:.3g}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color="tab:green")
    for mode, marker, color, label in (("small", "s", "tab:orange", "small only"),
                                       ("large", "*", "tab:red", "large only"),
                                       ("speculative", "P", "tab:purple", "speculative")):
        _, x, y = group(mode)
        if x:
            ax.scatter(x, y, marker=marker, s=120, color=color, label=label, gid=f"{gid_prefix}{mode}", zorder=3)


def write_report(runs: list[Run], out: Path) -> list[Path]:
    """report.md, report.html (the figure inlined), one pareto PNG and JSON per dataset. Returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    sections, written = [], []
    datasets = by_dataset(runs)
    for i, group in enumerate(datasets):
        d = group[0].manifest["dataset"]
        stem = "pareto" if len(datasets) == 1 else f"pareto-{i + 1}"
        points = pareto_points(group)
        png = out / f"{stem}.png"
        pareto_figure(points, f"{d['name']}: accuracy vs large-model share").savefig(png)
        (out / f"{stem}.json").write_text(json.dumps({"dataset": d, "points": points}, indent=1) + "\n")
        written += [png, out / f"{stem}.json"]
        sections.append(_dataset_section(group, png))
    title = "ead evaluation report"
    (out / "report.md").write_text(f"# {title}\n\n" + "\n".join(_md(s) for s in sections))
    (out / "report.html").write_text(_html_page(title, sections))
    return [out / "report.md", out / "report.html", *written]


def _dataset_section(runs: list[Run], png: Path) -> dict:
    m = runs[0].manifest
    d, models = m["dataset"], m.get("models") or {}
    graders = sorted({f"{r.manifest['grader']['name']} {r.manifest['grader']['version']}" for r in runs})
    budgets = sorted({str(r.manifest["config"]["max_new_tokens"]) for r in runs})
    notes = [f"dataset `{d['name']}` (sha256 {d['sha256'][:12]}…)",
             f"models: {models.get('small', {}).get('source')} -> {models.get('large', {}).get('source')}",
             f"graded by {', '.join(graders)}; max_new_tokens {', '.join(budgets)}",
             ("% of large acc. and speed-up compare with the large-only run on the problems both finished; cost "
              "reduction is the paper's 1 - ((1-f) P_small + f P_large) / P_large; cut = stopped by max_new_tokens"),
             ("speed-up (and the plot's right panel) is measured wall-clock time: it compares only runs made one after "
              "another in one process on one machine, not runs that shared a GPU concurrently"),
             ("target share: budget mode's target, the random control's F, or a calibrated tau's target; share per "
              "problem: each problem's own large share, its mean and sd over the problems and 10th/90th percentiles")]
    head, body, _ = results_table(runs)
    tables = [("results", head, body)]
    for key, name in (("level", "by level"), ("subject", "by subject")):
        t = breakdown_table(runs, key)
        if t:
            tables.append((name, *t))
    return {"title": d["name"], "notes": notes, "tables": tables, "png": png}


def by_dataset(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped by the dataset file they read (its sha256), in order of first appearance: each group is
    compared with its own large-only run."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.manifest["dataset"]["sha256"], []).append(r)
    return list(groups.values())


def results_markdown(runs: list[Run]) -> str:
    """The results table alone, as the CLI prints it after a run: one table per dataset."""
    tables = []
    for group in by_dataset(runs):
        head, body, _ = results_table(group)
        tables.append(_md_table(head, body))
    return "\n".join(tables)


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def _md(section: dict) -> str:
    parts = [f"## {section['title']}\n", *[f"- {n}" for n in section["notes"]], ""]
    for name, head, body in section["tables"]:
        parts += [f"### {name}\n", _md_table(head, body)]
    parts.append(f"![accuracy vs large share]({section['png'].name})\n")
    return "\n".join(parts)


def _html_page(title: str, sections: list[dict]) -> str:
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    parts = [f"<!doctype html><meta charset='utf-8'><title>{title}</title><style>{style}</style><h1>{title}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s['title'])}</h2><ul>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in s["notes"]) + "</ul>")
        for name, head, body in s["tables"]:
            parts.append(f"<h3>{html.escape(name)}</h3><table><tr>"
                         + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                   for row in body) + "</table>")
        png = base64.b64encode(s["png"].read_bytes()).decode()
        parts.append(f"<img alt='accuracy vs large share' src='data:image/png;base64,{png}'>")
    return "\n".join(parts) + "\n"
