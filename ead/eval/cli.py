"""The `ead eval`, `ead sweep` and `ead report` subcommands: parse arguments, build RunSpecs, load the pair
once (and only when some problem is left to do), and print summaries for a person.

Reads EAD_DATA_DIR (where the benchmark files live). Running and resuming are `runs.py`'s business,
tables and plots `report.py`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ead.cli import add_model_args, load
from ead.config import BACKENDS, DEFAULT_MIN_DWELL_TOKENS, DEFAULT_THRESHOLD_BITS, DEFAULT_WINDOW_TOKENS
from ead.errors import ConfigError
from ead.eval.datasets import BUILTIN, Dataset, load_dataset
from ead.eval.report import Run, load_runs, results_markdown, write_report
from ead.eval.runs import (MODES, RunSpec, RunState, describe_models, execute_run, open_run, overall_large_share,
                           read_rows)

EXAMPLES = """examples:
  ead eval --dataset gsm8k --mode ead --tau 0.5 --limit 100 --out runs/gsm8k-ead-0.5
  ead eval --dataset math500 --mode random --large-share-from runs/math500-ead-0.5 --out runs/math500-random
  ead sweep --dataset math500 --taus 0.25,0.5,1.0 --random-shares-from-ead --out runs/math500-sweep
  ead report runs/math500-sweep                        # report.md, report.html, pareto.png in that directory
"""


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    ev = sub.add_parser("eval", help="evaluate one routing mode on a benchmark (resumable)", formatter_class=fmt,
                        epilog=EXAMPLES, description="Generate and grade an answer per problem into RUN_DIR; "
                        "a stopped run resumes where it stopped when started again with the same settings.")
    _add_common(ev)
    ev.add_argument("--mode", choices=MODES, default="ead",
                    help="small / large = one model alone; ead = the entropy rule at --tau; random = the control: "
                         "d_min-token segments go to the large model at random, a share F of them (default ead)")
    ev.add_argument("--tau", type=float, default=DEFAULT_THRESHOLD_BITS,
                    help=f"threshold in bits for --mode ead (default {DEFAULT_THRESHOLD_BITS})")
    ev.add_argument("--large-share", type=float, metavar="F", help="for --mode random: the large model's share, 0..1")
    ev.add_argument("--calibration", metavar="FILE",
                    help="for --mode ead or hybrid: tau from a file `ead calibrate` wrote (instead of --tau), "
                         "checked against the pair when it loads")
    ev.add_argument("--large-share-from", metavar="EAD_RUN_DIR",
                    help="for --mode random: F = the measured large share of that finished run")
    ev.add_argument("--out", required=True, metavar="RUN_DIR", help="where results.jsonl and manifest.json go")
    ev.set_defaults(handler=cmd_eval)

    sw = sub.add_parser("sweep", help="small, large, EAD at several tau and random controls, one loaded pair",
                        formatter_class=fmt, epilog=EXAMPLES,
                        description="Run small-only, large-only, EAD at each tau and optionally the random control "
                                    "at each EAD run's measured share, each in its own SWEEP_DIR/<name>; resumable.")
    _add_common(sw)
    sw.add_argument("--taus", required=True, help="comma-separated thresholds in bits, e.g. 0.25,0.5,1.0")
    sw.add_argument("--random-shares-from-ead", action="store_true",
                    help="after the EAD runs, run the random control at each one's measured large share")
    sw.add_argument("--random-taus", help="only for these taus (comma-separated subset of --taus)")
    sw.add_argument("--random-shares", help="random controls at these explicit shares too, e.g. 0.1,0.3")
    sw.add_argument("--speculative", action="store_true",
                    help="also run speculative decoding (lossless: checked against the large-only run)")
    sw.add_argument("--hybrid-taus", help="also EAD with speculation in its large segments at these taus")
    sw.add_argument("--out", required=True, metavar="SWEEP_DIR")
    sw.set_defaults(handler=cmd_sweep)

    rp = sub.add_parser("report", help="tables and a Pareto plot from run or sweep directories",
                        description="Write report.md, report.html and pareto.png (+ pareto.json, the plotted points) "
                                    "from finished or partial runs.")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or sweep directories holding runs")
    rp.add_argument("--out", metavar="DIR", help="where to write (default: the directory given, if only one)")
    rp.set_defaults(handler=cmd_report)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help=f"{', '.join(BUILTIN)} (from $EAD_DATA_DIR or ../shared/data) "
                                                    "or a .jsonl file with 'question' and 'answer' keys")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--seed", type=int, default=0, help="seeds the random control (per problem) and any sampling")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer budget (default 1024 for gsm8k, 2048 otherwise); cut answers are counted")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW_TOKENS, help="rolling-mean window, tokens")
    p.add_argument("--d-min", type=int, default=DEFAULT_MIN_DWELL_TOKENS,
                   help="minimum dwell, tokens; also the random control's segment length")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--batch", type=int, default=1,
                   help="problems generated together (needs ead.engine.BatchEngine; else one at a time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_args(p)


def _dataset(args: argparse.Namespace) -> Dataset:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    data_dir = os.environ.get("EAD_DATA_DIR")
    return load_dataset(args.dataset, Path(data_dir).expanduser() if data_dir else None)


def _spec(args: argparse.Namespace, dataset: Dataset, mode: str, tau: float | None = None,
          share: float | None = None) -> RunSpec:
    budget = args.max_new_tokens or (1024 if dataset.name == "gsm8k" else 2048)
    return RunSpec(dataset=dataset.name, mode=mode, small=args.small, large=args.large, tau=tau, large_share=share,
                   window=args.window, d_min=args.d_min, seed=args.seed, max_new_tokens=budget,
                   temperature=args.temperature, top_p=args.top_p, backend=args.backend, device=args.device,
                   dtype=args.dtype)


def _lazy_engine(args: argparse.Namespace) -> Callable[[str], tuple]:
    """get(engine mode) -> (engine, models description, batch). The pair is loaded on the first call and shared
    by every run; one engine per engine mode ("ead" for small, large, ead and random runs)."""
    pairs: list = []
    engines: dict[str, tuple] = {}

    def get(mode: str = "ead") -> tuple:
        if mode not in engines:
            import ead.engine
            from ead.config import EngineConfig, RouterConfig

            if not pairs:
                pairs.append(load(args))
                if getattr(args, "calibration", None):  # refuse a tau calibrated for another pair or rule
                    from ead.calibrate import load_calibration
                    from ead.routing import RoutingConfig

                    rule = RouterConfig(window_tokens=args.window, min_dwell_tokens=args.d_min)
                    load_calibration(args.calibration, pairs[0], RoutingConfig.from_router_config(rule))
            pair, cfg, batch = pairs[0], EngineConfig(backend=args.backend), max(1, args.batch)
            if batch > 1:
                engine = ead.engine.BatchEngine(pair, RouterConfig(), cfg, max_batch=batch, mode=mode)
            else:
                engine = ead.engine.Engine(pair, RouterConfig(), cfg, mode=mode)
            engines[mode] = (engine, describe_models(pair), batch)
        return engines[mode]

    return get


def _run(state: RunState, get: Callable[[], tuple], args: argparse.Namespace, extra: dict | None = None) -> None:
    if state.finished:
        print(f"{state.out}: all {len(state.problems)} problems done; nothing to run", file=sys.stderr)
        return
    engine, models, batch = get(state.spec.engine_mode)
    execute_run(state, engine, models, batch, progress=not args.no_progress, extra=extra)


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, e.g. 0.25,0.5,1.0; got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} is empty; give comma-separated numbers, e.g. 0.25,0.5,1.0")
    return values


def _share_of(rows: list[dict], where: Path) -> float:
    if not rows:
        raise ConfigError(f"{where} has no finished problems to take the large share from; run it first")
    return overall_large_share(rows)


def cmd_eval(args: argparse.Namespace) -> int:
    dataset = _dataset(args)
    share = args.large_share
    if args.mode == "random" and args.large_share_from:
        src = Path(args.large_share_from)
        share = _share_of(read_rows(src / "results.jsonl"), src)
    tau = args.tau
    if args.calibration and args.mode in ("ead", "hybrid"):
        from ead.calibrate import read_calibration

        tau = read_calibration(args.calibration)[0]
    spec = _spec(args, dataset, args.mode, tau=tau if args.mode in ("ead", "hybrid") else None,
                 share=share if args.mode == "random" else None)
    state = open_run(Path(args.out), spec, dataset, args.limit)
    extra = {"large_share_from": args.large_share_from} if args.mode == "random" else None
    _run(state, _lazy_engine(args), args, extra)
    print(results_markdown([Run(state.out, state.manifest, state.rows)]))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    dataset, out = _dataset(args), Path(args.out)
    taus = _floats(args.taus, "--taus")
    plan = [("small", _spec(args, dataset, "small")), ("large", _spec(args, dataset, "large"))]
    plan += [(f"ead-tau{t:g}", _spec(args, dataset, "ead", tau=t)) for t in taus]
    if args.speculative:
        plan.append(("speculative", _spec(args, dataset, "speculative")))
    hybrid_taus = _floats(args.hybrid_taus, "--hybrid-taus") if args.hybrid_taus else []
    plan += [(f"hybrid-tau{t:g}", _spec(args, dataset, "hybrid", tau=t)) for t in hybrid_taus]
    states = {name: open_run(out / name, spec, dataset, args.limit) for name, spec in plan}  # refuse mismatches now
    random_taus = _floats(args.random_taus, "--random-taus") if args.random_taus else \
        taus if args.random_shares_from_ead else []
    if unknown := [t for t in random_taus if t not in taus]:
        raise ConfigError(f"--random-taus {unknown} are not among --taus {taus}; pick a subset of --taus")
    get = _lazy_engine(args)
    for state in states.values():
        _run(state, get, args)
    controls = []
    for t in random_taus:
        ead_state = states[f"ead-tau{t:g}"]
        ids = {p.id for p in ead_state.problems}
        share = _share_of([r for r in ead_state.rows if r["id"] in ids], ead_state.out)
        controls.append((f"random-tau{t:g}", share, {"control_of": f"ead-tau{t:g}"}))
    if args.random_shares:
        controls += [(f"random-f{f:g}", f, None) for f in _floats(args.random_shares, "--random-shares")]
    for name, share, extra in controls:
        states[name] = open_run(out / name, _spec(args, dataset, "random", share=share), dataset, args.limit)
        _run(states[name], get, args, extra)
    summary = {"dataset": dataset.name, "taus": taus, "runs": list(states)}
    if args.speculative:  # lossless by construction: its answers must be the large model's
        summary["speculative_vs_large"] = check_lossless(states["speculative"].rows, states["large"].rows)
        print(f"speculative vs large only: {summary['speculative_vs_large']}", file=sys.stderr)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(results_markdown(load_runs([out / name for name in states])))
    return 0


def check_lossless(spec_rows: list[dict], large_rows: list[dict]) -> dict:
    """How far a speculative run is from the large-only run on the problems both finished: outputs and
    correctness that differ. Greedy speculation is exact in exact arithmetic; in bf16 on a GPU a verification
    pass and a decode step may round a near tie apart, so a few differing outputs are possible, not more."""
    large = {r["id"]: r for r in large_rows}
    both = [(r, large[r["id"]]) for r in spec_rows if r["id"] in large]
    return {"problems": len(both), "different_output": sum(a["output"] != b["output"] for a, b in both),
            "different_correct": sum(a["correct"] != b["correct"] for a, b in both)}


def cmd_report(args: argparse.Namespace) -> int:
    if args.out is None and len(args.runs) > 1:
        raise ConfigError("with several run directories, say where the report goes: --out DIR")
    runs = load_runs([Path(p) for p in args.runs])
    paths = write_report(runs, Path(args.out or args.runs[0]))
    print(results_markdown(runs))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
