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

from ead.cli import add_model_args, add_schedule_arg, load
from ead.config import BACKENDS, DEFAULT_MIN_DWELL_TOKENS, DEFAULT_THRESHOLD_BITS, DEFAULT_WINDOW_TOKENS
from ead.errors import ConfigError
from ead.eval.datasets import BUILTIN, Dataset, load_dataset
from ead.eval.report import Run, load_runs, results_markdown, write_report
from ead.eval.runs import (MODES, ROUTED_MODES, RunSpec, RunState, describe_models, execute_run, open_run,
                           overall_large_share, read_rows)
from ead.routing import SIGNALS, RoutingConfig

EXAMPLES = """examples:
  ead eval --dataset gsm8k --mode ead --tau 0.5 --limit 100 --out runs/gsm8k-ead-0.5
  ead eval --dataset gsm8k --signal varentropy --tau 0.8 --tau-down 0.5 --out runs/gsm8k-varentropy
  ead eval --dataset gsm8k --mode budget --large-share 0.25 --out runs/gsm8k-budget-0.25
  ead eval --dataset gsm8k --calibration top1-f0.25.json --out runs/gsm8k-top1   # signal and tau from the file
  ead eval --dataset math500 --mode random --large-share-from runs/math500-ead-0.5 --out runs/math500-random
  ead sweep --dataset math500 --taus 0.25,0.5,1.0 --random-shares-from-ead --out runs/math500-sweep
  ead sweep --dataset gsm8k --calibrations top1-f0.25.json,margin-f0.25.json --budget-shares 0.25 \\
      --random-shares-from-ead --out runs/gsm8k-signals
  ead report runs/math500-sweep                        # report.md, report.html, pareto.png in that directory
"""


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    ev = sub.add_parser("eval", help="evaluate one routing mode on a benchmark (resumable)", formatter_class=fmt,
                        epilog=EXAMPLES, description="Generate and grade an answer per problem into RUN_DIR; "
                        "a stopped run resumes where it stopped when started again with the same settings.")
    _add_common(ev)
    ev.add_argument("--mode", choices=MODES, default="ead",
                    help="small / large = one model alone; ead = the EAD rule on --signal at --tau; budget = EAD "
                         "with tau steered so the large model writes --large-share F of each answer; random = the "
                         "control: d_min-token segments go to the large model at random, a share F of them; "
                         "speculative / hybrid = with speculative decoding (default ead)")
    ev.add_argument("--signal", choices=list(SIGNALS), default=None,
                    help="routing signal for ead, budget and hybrid (default entropy, or the --calibration file's)")
    ev.add_argument("--tau", type=float, default=DEFAULT_THRESHOLD_BITS,
                    help=f"threshold in the signal's units (entropy: bits) for ead and hybrid; budget mode's "
                         f"starting point (default {DEFAULT_THRESHOLD_BITS})")
    ev.add_argument("--tau-down", type=float, default=None,
                    help="hysteresis: once large, stay large until the mean is <= this (default: --tau)")
    ev.add_argument("--large-share", type=float, metavar="F",
                    help="0..1: --mode budget's target share of tokens by the large model, --mode random's share")
    ev.add_argument("--calibration", metavar="FILE",
                    help="for ead, budget or hybrid: signal and tau (budget: the start) from a file `ead calibrate` "
                         "wrote, instead of --tau; checked against the pair when it loads")
    ev.add_argument("--large-share-from", metavar="EAD_RUN_DIR",
                    help="for --mode random: F = the measured large share of that finished run")
    ev.add_argument("--out", required=True, metavar="RUN_DIR", help="where results.jsonl and manifest.json go")
    add_schedule_arg(ev, "with --batch > 1, modes ead, budget and random; the run's manifest keeps it and a resumed "
                         "run must repeat it")
    ev.set_defaults(handler=cmd_eval)

    sw = sub.add_parser("sweep", help="small, large, EAD at several tau and random controls, one loaded pair",
                        formatter_class=fmt, epilog=EXAMPLES,
                        description="Run small-only, large-only, EAD at each tau (on --signal), budget-mode runs, "
                                    "one EAD run per calibration file, and optionally the random control at each EAD "
                                    "run's measured share, each in its own SWEEP_DIR/<name>; resumable.")
    _add_common(sw)
    sw.add_argument("--taus", help="EAD runs at these comma-separated thresholds in --signal's units, e.g. "
                                   "0.25,0.5,1.0 (dirs ead-tau0.5, or ead-SIGNAL-tau0.5 for another signal)")
    sw.add_argument("--signal", choices=list(SIGNALS), default="entropy",
                    help="routing signal of the --taus, --hybrid-taus and --budget-shares runs (default entropy)")
    sw.add_argument("--budget-shares", metavar="F,F",
                    help="budget-mode runs at these target shares, e.g. 0.1,0.25 (dirs budget-f0.25, or "
                         f"budget-SIGNAL-f0.25), each starting from tau {DEFAULT_THRESHOLD_BITS}")
    sw.add_argument("--calibrations", metavar="FILE,FILE",
                    help="one EAD run per `ead calibrate` file, at its signal and tau (dirs calib-SIGNAL-fTARGET)")
    sw.add_argument("--random-shares-from-ead", action="store_true",
                    help="after the EAD runs, run the random control at each one's measured large share (every "
                         "--taus, --budget-shares and --calibrations run, unless --random-taus/--random-from pick)")
    sw.add_argument("--random-taus", help="random controls for these taus only (comma-separated subset of --taus)")
    sw.add_argument("--random-from", metavar="NAME,NAME",
                    help="random controls at the measured shares of these runs of the sweep, e.g. "
                         "budget-f0.25,calib-top1-f0.25 (dirs random-budget-f0.25, ...)")
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
                   help="answer budget (default 1024 for gsm8k, 4096 otherwise); cut answers are counted")
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


def answer_budget(args: argparse.Namespace, dataset: Dataset) -> int:
    """--max-new-tokens, or the dataset's default: 1024 for GSM8K; 4096 otherwise, where at 2048 7.6% of the
    default large model's MATH-500 answers were cut (5.4% at 4096, mostly repetition loops; EVALUATION.md)."""
    return args.max_new_tokens or (1024 if dataset.name == "gsm8k" else 4096)


def _spec(args: argparse.Namespace, dataset: Dataset, mode: str, tau: float | None = None,
          share: float | None = None, signal: str = "entropy", tau_down: float | None = None) -> RunSpec:
    budget = answer_budget(args, dataset)
    return RunSpec(dataset=dataset.name, mode=mode, small=args.small, large=args.large, tau=tau, large_share=share,
                   window=args.window, d_min=args.d_min, seed=args.seed, max_new_tokens=budget,
                   temperature=args.temperature, top_p=args.top_p, backend=args.backend, device=args.device,
                   dtype=args.dtype, signal=signal, tau_down=tau_down, schedule=getattr(args, "schedule", "exact"))


def _calibration(path: str, signal: str | None, args: argparse.Namespace) -> tuple[float, str, dict]:
    """(tau, signal, the note the manifest keeps) from a file `ead calibrate` wrote, checked against the flags
    before any model loads: the run takes the file's signal, which an explicit --signal must repeat, and the
    file's window and d_min must be the run's. The pair is checked when it loads (_lazy_engine)."""
    from ead.calibrate import read_calibration

    tau, _, settings = read_calibration(path)
    made = settings.get("signal", "entropy")
    if signal is not None and signal != made:
        raise ConfigError(f"{path} holds a tau for signal {made!r}, but --signal {signal} was given; drop --signal "
                          f"to route on {made} at the calibrated tau, or make a {signal} calibration with `ead "
                          f"calibrate --signal {signal} --large-share F --out FILE`")
    for key, flag, here in (("window_tokens", "--window", args.window), ("min_dwell_tokens", "--d-min", args.d_min)):
        if settings.get(key, here) != here:
            raise ConfigError(f"{path} was calibrated with {flag} {settings[key]}, but this run has {flag} {here}; "
                              f"pass {flag} {settings[key]}, or calibrate again with {flag} {here}")
    target = json.loads(Path(path).read_text()).get("target_large_share")
    return tau, made, {"path": str(path), "signal": made, "tau": tau, "target_large_share": target}


def _lazy_engine(args: argparse.Namespace, budget: int,
                 calibrations: list[tuple[str, RoutingConfig]] = ()) -> Callable[[str], tuple]:
    """get(engine mode, schedule) -> (engine, models description, batch), with a context for `budget` new tokens.
    The pair is loaded on the first call and shared by every run; one engine per engine mode ("ead" for small,
    large, ead, budget and random runs) and schedule. Each (calibration file, routing) is checked against the pair
    as it loads: a tau does not carry over to another."""
    pairs: list = []
    engines: dict[tuple[str, str], tuple] = {}

    def get(mode: str = "ead", schedule: str = "exact") -> tuple:
        if (mode, schedule) not in engines:
            import ead.engine
            from ead.calibrate import load_calibration
            from ead.config import EngineConfig, RouterConfig

            if not pairs:
                pairs.append(load(args))
                for path, routing in calibrations:
                    load_calibration(path, pairs[0], routing)
            pair, batch = pairs[0], max(1, args.batch)
            cfg = EngineConfig(backend=args.backend, max_seq_tokens=eval_context(pair, budget))
            if batch > 1:
                engine = ead.engine.BatchEngine(pair, RouterConfig(), cfg, max_batch=batch, mode=mode,
                                                schedule=schedule)
            else:
                engine = ead.engine.Engine(pair, RouterConfig(), cfg, mode=mode, schedule=schedule)
            engines[mode, schedule] = (engine, describe_models(pair), batch)
        return engines[mode, schedule]

    return get


# Prompt tokens allowed for on top of --max-new-tokens when the context must grow: MATH-500's longest prompt with
# the chat template and instruction is well under 1024 tokens.
PROMPT_ALLOWANCE = 1024


def eval_context(pair, max_new_tokens: int | None) -> int | None:
    """The runners' context (max_seq_tokens) for an answer budget of `max_new_tokens`: None (the runners' default,
    4096 tokens) while the budget plus PROMPT_ALLOWANCE fits it, else that sum, capped at the smaller model's
    trained positions (a model without a config, as llama.cpp's, does not cap it). Without this, answers longer
    than the default context minus the prompt would be cut before their budget."""
    need = (max_new_tokens or 0) + PROMPT_ALLOWANCE
    if need <= 4096:
        return None
    limit = min(getattr(getattr(m.model, "config", None), "max_position_embeddings", need)
                for m in (pair.small, pair.large))
    return min(need, limit)


def _run(state: RunState, get: Callable[[], tuple], args: argparse.Namespace, extra: dict | None = None) -> None:
    if state.finished:
        print(f"{state.out}: all {len(state.problems)} problems done; nothing to run", file=sys.stderr)
        return
    engine, models, batch = get(state.spec.engine_mode, state.spec.schedule)
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
    routed = args.mode in ROUTED_MODES
    if args.calibration and not routed:
        raise ConfigError(f"--calibration gives a routing threshold, which mode {args.mode!r} does not use; pass "
                          f"--mode {', '.join(ROUTED_MODES)} or drop --calibration")
    share = args.large_share
    if args.mode == "random" and args.large_share_from:
        src = Path(args.large_share_from)
        share = _share_of(read_rows(src / "results.jsonl"), src)
    tau, signal, extra = args.tau, args.signal or "entropy", {}
    if args.calibration:
        tau, signal, extra["calibration"] = _calibration(args.calibration, args.signal, args)
    spec = _spec(args, dataset, args.mode, tau=tau if routed else None,
                 share=share if args.mode in ("random", "budget") else None, signal=signal, tau_down=args.tau_down)
    state = open_run(Path(args.out), spec, dataset, args.limit)
    if args.mode == "random":
        extra["large_share_from"] = args.large_share_from
    checks = [(args.calibration, spec.routing_config())] if args.calibration else []
    _run(state, _lazy_engine(args, answer_budget(args, dataset), checks), args, extra or None)
    print(results_markdown([Run(state.out, state.manifest, state.rows)]))
    return 0


def sweep_plan(args: argparse.Namespace, dataset: Dataset) -> tuple[list[tuple[str, RunSpec]], dict[str, dict],
                                                                     list[tuple[str, RoutingConfig]]]:
    """The runs of a sweep before its random controls: [(directory name, spec)], the manifest notes of the
    calibrated runs by name, and the (calibration file, routing) pairs to check against the pair. A run on
    --signal other than entropy carries the signal in its name (ead-tau0.5, ead-varentropy-tau0.5), so sweeps on
    several signals can share one directory and an older sweep's names still resume."""
    sig = "" if args.signal == "entropy" else f"{args.signal}-"
    plan = [("small", _spec(args, dataset, "small")), ("large", _spec(args, dataset, "large"))]
    taus = _floats(args.taus, "--taus") if args.taus else []
    plan += [(f"ead-{sig}tau{t:g}", _spec(args, dataset, "ead", tau=t, signal=args.signal)) for t in taus]
    shares = _floats(args.budget_shares, "--budget-shares") if args.budget_shares else []
    plan += [(f"budget-{sig}f{f:g}", _spec(args, dataset, "budget", tau=DEFAULT_THRESHOLD_BITS, share=f,
                                           signal=args.signal)) for f in shares]
    notes, checks = {}, []
    for path in [p.strip() for p in (args.calibrations or "").split(",") if p.strip()]:
        tau, signal, note = _calibration(path, None, args)
        if note["target_large_share"] is None:
            raise ConfigError(f"{path} records no target_large_share to name its run by; make it again with "
                              "`ead calibrate --large-share F`")
        name = f"calib-{signal}-f{note['target_large_share']:g}"
        if name in notes:
            raise ConfigError(f"{notes[name]['calibration']['path']} and {path} are both {signal} calibrations for a "
                              f"{note['target_large_share']:g} share, so both runs would be {name}; give one of them")
        plan.append((name, _spec(args, dataset, "ead", tau=tau, signal=signal)))
        notes[name] = {"calibration": note}
        checks.append((path, plan[-1][1].routing_config()))
    if args.speculative:
        plan.append(("speculative", _spec(args, dataset, "speculative")))
    hybrid_taus = _floats(args.hybrid_taus, "--hybrid-taus") if args.hybrid_taus else []
    plan += [(f"hybrid-{sig}tau{t:g}", _spec(args, dataset, "hybrid", tau=t, signal=args.signal)) for t in hybrid_taus]
    names = [name for name, _ in plan]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"the sweep would run {', '.join(dup)} twice; give each tau and share once")
    return plan, notes, checks


def control_sources(args: argparse.Namespace, plan: list[tuple[str, RunSpec]]) -> list[str]:
    """Names of the sweep's runs that get a random control at their measured share, in plan order: those
    --random-taus and --random-from pick or, with --random-shares-from-ead alone, every ead and budget run."""
    modes = {name: spec.mode for name, spec in plan}
    sig = "" if args.signal == "entropy" else f"{args.signal}-"
    picked = []
    if args.random_taus:
        taus = _floats(args.random_taus, "--random-taus")
        if unknown := [t for t in taus if modes.get(f"ead-{sig}tau{t:g}") != "ead"]:
            raise ConfigError(f"--random-taus {unknown} are not among --taus {args.taus}; pick a subset of --taus")
        picked += [f"ead-{sig}tau{t:g}" for t in taus]
    if args.random_from:
        names = [n.strip() for n in args.random_from.split(",") if n.strip()]
        routed = [n for n, m in modes.items() if m in ROUTED_MODES]
        if unknown := [n for n in names if n not in routed]:
            raise ConfigError(f"--random-from {unknown}: no such EAD run in this sweep; choose among "
                              f"{', '.join(routed) or '(none: add --taus, --budget-shares or --calibrations)'}")
        picked += names
    if args.random_shares_from_ead and not picked:
        picked = [n for n, m in modes.items() if m in ("ead", "budget")]
    return list(dict.fromkeys(picked))


def cmd_sweep(args: argparse.Namespace) -> int:
    dataset, out = _dataset(args), Path(args.out)
    plan, extras, checks = sweep_plan(args, dataset)
    sources = control_sources(args, plan)
    states = {name: open_run(out / name, spec, dataset, args.limit) for name, spec in plan}  # refuse mismatches now
    get = _lazy_engine(args, answer_budget(args, dataset), checks)
    for name, state in states.items():
        _run(state, get, args, extras.get(name))
    controls = []
    for source in sources:  # a control copies the share its run measured on this sweep's problems
        ids = {p.id for p in states[source].problems}
        share = _share_of([r for r in states[source].rows if r["id"] in ids], states[source].out)
        controls.append((f"random-{source.removeprefix('ead-')}", share, {"control_of": source}))
    if args.random_shares:
        controls += [(f"random-f{f:g}", f, None) for f in _floats(args.random_shares, "--random-shares")]
    for name, share, extra in controls:
        states[name] = open_run(out / name, _spec(args, dataset, "random", share=share), dataset, args.limit)
        _run(states[name], get, args, extra)
    summary = {"dataset": dataset.name, "signal": args.signal,
               "taus": _floats(args.taus, "--taus") if args.taus else [],
               "budget_shares": [spec.large_share for _, spec in plan if spec.mode == "budget"],
               "calibrations": {name: note["calibration"]["path"] for name, note in extras.items()},
               "runs": list(states)}
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
