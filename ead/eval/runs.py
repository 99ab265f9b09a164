"""One evaluation run in one directory: its spec, the prompts, the single call into the engine, and the files
that survive a kill.

RUN_DIR/manifest.json says what produced the run (models and their sha256, full config, dataset and its
sha256, versions, grader); RUN_DIR/results.jsonl holds one line per finished problem, appended, flushed and
fsynced one at a time. A run killed at any moment, `kill -9` included, resumes where it stopped: a trailing
partial line is dropped, finished ids are skipped, and a spec that differs from the manifest's is refused.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ead.config import DEFAULT_MIN_DWELL_TOKENS, DEFAULT_THRESHOLD_BITS, DEFAULT_WINDOW_TOKENS, SCHEDULES, Role
from ead.errors import ConfigError
from ead.eval.control import RandomRouter, problem_seed
from ead.eval.datasets import Dataset, Problem
from ead.eval.grading import grade, grader_info
from ead.metrics import GenerateResult
from ead.router import RoutingPolicy
from ead.routing import BudgetConfig, BudgetRouter, RoutingConfig, make_router
from ead.sampling import SamplingParams

# The instruction most MATH/GSM8K evaluations of instruction-tuned models use (Qwen2.5-Math's wording).
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MODES = ("small", "large", "ead", "budget", "random", "speculative", "hybrid")
# Modes whose router reads a routing signal (ead.routing): they take --signal and --tau-down.
ROUTED_MODES = ("ead", "budget", "hybrid")
# The engine mode each run mode needs: speculation changes how the engine steps, routing does not.
ENGINE_MODES = {"speculative": "speculative", "hybrid": "hybrid"}
# Modes in which both models write by routing, where the batch schedule can change the text (BatchEngine).
SCHEDULED_MODES = ("ead", "budget", "random")
MANIFEST, RESULTS = "manifest.json", "results.jsonl"


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's outputs. A run directory resumes only under an equal spec.

    Modes "ead" and "hybrid" route on `signal` (ead.routing.SIGNALS) at threshold `tau`, with hysteresis down to
    `tau_down` (None: the paper's rule). "budget" is EAD whose threshold a controller steers so that the large
    model writes `large_share` of each sequence's tokens (ead.routing.BudgetRouter), starting from `tau`.
    "random" gives d_min-token segments to the large model with probability `large_share`. "speculative" is the
    large model's text through speculative decoding (the engine's defaults, 4 drafted tokens a pass): its
    accuracy must equal "large"'s, which `ead sweep` checks. `small`/`large` None mean the default pair;
    `device`/`dtype` None the automatic choice. `schedule` "throughput" (modes ead, budget, random) lets the
    batch engine's large rounds write tokens of rows routed to the small model (ead.engine.BatchEngine): the
    answers then depend on the batch and on timing, and the large share exceeds the routed one.
    """

    dataset: str
    mode: str
    small: str | None = None
    large: str | None = None
    tau: float | None = None
    large_share: float | None = None
    window: int = DEFAULT_WINDOW_TOKENS
    d_min: int = DEFAULT_MIN_DWELL_TOKENS
    seed: int = 0
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    backend: str = "auto"
    device: str | None = None
    dtype: str | None = None
    instruction: str = INSTRUCTION
    # Added after the first runs were made: a manifest without these keys holds their defaults (check_resumable).
    signal: str = "entropy"
    tau_down: float | None = None
    schedule: str = "exact"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule != "exact" and self.mode not in SCHEDULED_MODES:
            raise ConfigError(f"--schedule {self.schedule} applies to modes {', '.join(SCHEDULED_MODES)}, where both "
                              f"models write by routing; mode {self.mode!r} would not change, so drop --schedule")
        if self.mode in ("ead", "hybrid") and self.tau is None:
            raise ConfigError(f"mode {self.mode!r} needs a threshold: pass --tau, e.g. --tau 0.5")
        if self.mode == "budget" and self.tau is None:  # the controller's start; a calibrated tau is a better one
            object.__setattr__(self, "tau", DEFAULT_THRESHOLD_BITS)
        if self.mode == "random" and self.large_share is None:
            raise ConfigError("mode 'random' needs the large model's share: pass --large-share F (0..1) or "
                              "--large-share-from EAD_RUN_DIR")
        if self.mode == "budget" and self.large_share is None:
            raise ConfigError("mode 'budget' needs the target share of tokens for the large model: pass "
                              "--large-share F (0..1), e.g. --large-share 0.25")
        if self.mode not in ROUTED_MODES and (self.signal != "entropy" or self.tau_down is not None):
            raise ConfigError(f"--signal and --tau-down apply to modes {', '.join(ROUTED_MODES)}; mode "
                              f"{self.mode!r} reads no signal, so drop them (got signal {self.signal!r}, "
                              f"tau-down {self.tau_down!r})")
        if self.tau_down is not None and self.tau_down == self.tau:  # equal thresholds are the paper's rule
            object.__setattr__(self, "tau_down", None)
        self.routing_config()  # validates signal, tau, tau-down, window, d_min and the budget target
        if self.mode == "random":
            RandomRouter(self.large_share, 0)  # validates the share
        self.sampling()  # validates temperature, top_p, max_new_tokens

    def routing_config(self) -> RoutingConfig:
        """The router settings of every mode but random (whose router is RandomRouter; this only checks its
        window and d_min)."""
        if self.mode in ("large", "speculative"):  # speculative: the engine gives every token to the large model
            return RoutingConfig(threshold=-math.inf, window_tokens=self.window, min_dwell_tokens=0,
                                 start=Role.LARGE)
        if self.mode not in ROUTED_MODES:
            return RoutingConfig(threshold=math.inf, window_tokens=self.window, min_dwell_tokens=self.d_min)
        budget = BudgetConfig(self.large_share) if self.mode == "budget" else None
        return RoutingConfig(signal=self.signal, threshold=self.tau, threshold_down=self.tau_down,
                             window_tokens=self.window, min_dwell_tokens=self.d_min, budget=budget)

    def make_router(self, problem_id: str) -> RoutingPolicy:
        """A fresh router for one problem: ead.routing's SignalRouter, or BudgetRouter in budget mode; the random
        control's is seeded by --seed and the problem id."""
        if self.mode == "random":
            return RandomRouter(self.large_share, problem_seed(self.seed, problem_id), self.d_min, self.window)
        return make_router(self.routing_config())

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              max_new_tokens=self.max_new_tokens)

    def to_json(self) -> dict:
        """Plain JSON (infinite tau as "inf"), the form kept in the manifest and compared on resume."""
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @property
    def engine_mode(self) -> str:
        return ENGINE_MODES.get(self.mode, "ead")

    def label(self) -> str:
        """E.g. "EAD tau=0.5", "EAD varentropy tau=0.8", "EAD tau=0.4/0.2 (hysteresis)", "EAD budget 25%"; the
        throughput schedule adds ", throughput schedule"."""
        schedule = "" if self.schedule == "exact" else f", {self.schedule} schedule"
        return self._rule_label() + schedule

    def _rule_label(self) -> str:
        if self.mode == "speculative":
            return "speculative"
        if self.mode == "random":
            return f"random F={self.large_share:.3f}"
        if self.mode not in ROUTED_MODES:
            return f"{self.mode} only"
        name = ("hybrid" if self.mode == "hybrid" else "EAD") + ("" if self.signal == "entropy" else f" {self.signal}")
        down = "" if self.tau_down is None else f"/{self.tau_down:g}"
        if self.mode == "budget":
            start = f", start tau={self.tau:g}{down}" if down else ""
            return f"{name} budget {100 * self.large_share:.4g}%{start}"
        return f"{name} tau={self.tau:g}{down}" + (" (hysteresis)" if down else "")


@dataclass
class RunState:
    """A run directory as found: its manifest (None if new), finished rows, and the problems still to do."""

    out: Path
    spec: RunSpec
    dataset: Dataset
    problems: list[Problem]
    manifest: dict | None
    rows: list[dict] = field(default_factory=list)

    @property
    def pending(self) -> list[Problem]:
        done = {r["id"] for r in self.rows}
        return [p for p in self.problems if p.id not in done]

    @property
    def finished(self) -> bool:
        return not self.pending


def open_run(out: Path, spec: RunSpec, dataset: Dataset, limit: int | None = None) -> RunState:
    """Read RUN_DIR without changing it. Raises ConfigError when it was started under another spec or dataset."""
    out = Path(out)
    problems = dataset.problems[:limit] if limit is not None else dataset.problems
    manifest_path, results_path = out / MANIFEST, out / RESULTS
    manifest = None
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        check_resumable(manifest, spec, dataset, out)
    elif results_path.is_file() and results_path.stat().st_size > 0:
        raise ConfigError(f"{out} has {RESULTS} but no {MANIFEST}, so how it was made is unknown; "
                          "use a new --out directory")
    rows = read_rows(results_path) if results_path.is_file() else []
    return RunState(out=out, spec=spec, dataset=dataset, problems=problems, manifest=manifest, rows=rows)


def check_resumable(manifest: dict, spec: RunSpec, dataset: Dataset, out: Path) -> None:
    """Refuse a spec or dataset other than the manifest's. A key the manifest lacks was added to RunSpec after the
    run was made, when its behaviour was the new field's default; so the default stands in for it."""
    defaults = {f.name: f.default for f in fields(RunSpec) if f.default is not MISSING}
    old, new = defaults | manifest.get("config", {}), spec.to_json()
    diff = [f"{k}={old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if manifest.get("dataset", {}).get("sha256") != dataset.sha256:
        diff.append(f"dataset file sha256 {manifest.get('dataset', {}).get('sha256')} -> {dataset.sha256}")
    if diff:
        raise ConfigError(f"{out} was started with other settings ({'; '.join(diff)}); pass the same settings to "
                          "resume it, or choose a new --out directory")


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The complete lines of results.jsonl. A trailing line without its newline was cut by a kill: it is
    ignored, and with `repair` truncated away so that the next append starts a fresh line."""
    data = path.read_bytes() if path.is_file() else b""
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    rows = []
    for n, line in enumerate(data[:end].splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError(f"{path} line {n} is damaged (not JSON); delete that line to redo the "
                              "problem") from None
    return rows


def generate_rows(engine, prompt_ids_list: list[list[int]], sampling: SamplingParams, routers: list[RoutingPolicy],
                  on_result: Callable[[int, GenerateResult], None] | None = None) -> list[GenerateResult]:
    """The harness's one call into the engine. One result per prompt, in order; each also reaches
    `on_result(index, result)` as soon as its sequence finishes, so rows are saved while others still run.

    A batch engine (`generate_many`) runs the prompts together, its free slots refilled from the rest; the
    one-sequence `Engine` runs them one after another.
    """
    report = on_result or (lambda i, result: None)
    if not hasattr(engine, "generate_many"):
        results = []
        for i, (ids, router) in enumerate(zip(prompt_ids_list, routers)):
            results.append(engine.generate(ids, sampling, router=router))
            report(i, results[-1])
        return results
    index, reported = {id(r): i for i, r in enumerate(routers)}, set()

    def on_step(seq, record) -> None:  # each sequence has its own router: that is how we know which finished
        i = index.get(id(seq.router))
        if seq.finish_reason is not None and i is not None and i not in reported:
            reported.add(i)
            report(i, engine.result(seq))

    results = engine.generate_many(prompt_ids_list, sampling, routers=routers, on_step=on_step)
    for i in sorted(set(range(len(results))) - reported):
        report(i, results[i])
    return results


def execute_run(state: RunState, engine, models: dict, batch: int = 1, progress: bool = True,
                extra: dict | None = None) -> list[dict]:
    """Generate and grade every pending problem, appending each row durably the moment its sequence finishes
    (with a batch engine, rows land in finishing order). Writes the manifest first if the directory is new.
    Returns every row of the run, old and new."""
    state.out.mkdir(parents=True, exist_ok=True)
    with open(state.out / RESULTS, "ab") as f:
        try:  # two processes appending to one run would duplicate rows; the lock dies with its process
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another ead process is writing {state.out}; wait for it or stop it") from None
        state.rows = read_rows(state.out / RESULTS, repair=True)
        if state.manifest is None:
            state.manifest = write_manifest(state, models, batch, extra)
        elif state.manifest.get("limit") != len(state.problems):  # resumed with another --limit
            _write_json(state.out / MANIFEST, {**state.manifest, "limit": len(state.problems)})
        bar = _progress_bar(state, progress)
        last = [time.perf_counter()]

        def save(problem: Problem, prompt: str, prompt_tokens: int, result: GenerateResult | None,
                 router: RoutingPolicy | None = None) -> None:
            # wall_seconds: time since the previous row, grading excluded; summed, the run's generation time.
            row = make_row(problem, prompt, prompt_tokens, result, state.dataset.style, time.perf_counter() - last[0])
            if isinstance(router, BudgetRouter):  # where the controller left the threshold for this problem
                row["tau_final"] = router.threshold
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
            state.rows.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(running_summary(state.rows), refresh=False)
            last[0] = time.perf_counter()

        pending, chunk = state.pending, 8 * batch  # chunks bound the traces held in memory
        try:
            for start in range(0, len(pending), chunk):
                _solve(engine, state.spec, pending[start:start + chunk], save)
        finally:
            if bar is not None:
                bar.close()
    return state.rows


def _solve(engine, spec: RunSpec, problems: list[Problem], save: Callable) -> None:
    """Prompt, generate and save each problem; a prompt longer than the context is saved with no output."""
    todo = []
    for p in problems:
        prompt = f"{p.question}\n\n{spec.instruction}"
        ids = engine.pair.encode([{"role": "user", "content": prompt}])
        if len(ids) >= getattr(engine, "max_seq_tokens", math.inf):
            save(p, prompt, len(ids), None)
        else:
            todo.append((p, prompt, ids))
    routers = [spec.make_router(p.id) for p, _, _ in todo]
    generate_rows(engine, [ids for _, _, ids in todo], spec.sampling(), routers,
                  on_result=lambda i, result: save(todo[i][0], todo[i][1], len(todo[i][2]), result, routers[i]))


def make_row(problem: Problem, prompt: str, prompt_tokens: int, result: GenerateResult | None, style: str,
             wall_seconds: float = 0.0) -> dict:
    """One line of results.jsonl. `result` None means the prompt did not fit the context (nothing generated).
    `seconds` is the sequence's own start-to-finish time (overlapping others in a batch); `wall_seconds` its
    share of the run's wall clock, which the report's speed-up uses."""
    output = result.text if result else ""
    answer, correct = grade(output, problem.gold, style)
    s = result.stats if result else None
    row = {"id": problem.id, "prompt": prompt, "output": output, "answer": answer, "gold": problem.gold,
           "correct": correct, "tokens_small": s.tokens_small if s else 0, "tokens_large": s.tokens_large if s else 0,
           "large_share": s.large_share if s else 0.0, "switches": s.switches if s else 0,
           "catchup_tokens": s.catchup_tokens if s else 0, "cost_ratio": s.cost_ratio if s else 0.0,
           "seconds": s.seconds if s else 0.0, "wall_seconds": wall_seconds, "prompt_tokens": prompt_tokens,
           "finish_reason": result.finish_reason if result else "prompt_too_long"}
    if problem.level is not None:
        row["level"] = problem.level
    if problem.subject is not None:
        row["subject"] = problem.subject
    return row


def overall_large_share(rows: list[dict]) -> float:
    """The large model's share of all generated tokens of a run (token-weighted, the paper's f)."""
    large = sum(r["tokens_large"] for r in rows)
    total = large + sum(r["tokens_small"] for r in rows)
    return large / total if total else 0.0


def running_summary(rows: list[dict]) -> str:
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    cut = sum(r["finish_reason"] == "length" for r in rows)
    return f"acc {correct / n:.1%} ({correct}/{n}), large {overall_large_share(rows):.1%}, cut {cut}" if n else ""


def _progress_bar(state: RunState, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    bar = tqdm(total=len(state.problems), initial=len(state.problems) - len(state.pending), unit="problem",
               desc=f"{state.dataset.name} {state.spec.label()}", file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix_str(running_summary(state.rows), refresh=False)
    return bar


def write_manifest(state: RunState, models: dict, batch: int, extra: dict | None) -> dict:
    """manifest.json: what produced the run, enough to reproduce it and to refuse a mismatched resume."""
    d = state.dataset
    manifest = {
        "config": state.spec.to_json(),
        "label": state.spec.label(),
        "limit": len(state.problems),
        "dataset": {"name": d.name, "path": str(d.path), "sha256": d.sha256, "rows": len(d.problems),
                    "answer_style": d.style},
        "models": models,
        "grader": grader_info(),
        "versions": versions(),
        "engine": {"batch": batch},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    _write_json(state.out / MANIFEST, manifest)
    return manifest


def _write_json(path: Path, obj: dict) -> None:
    """Atomically: a temporary file renamed into place, so a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def versions() -> dict:
    import torch
    import transformers

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"ead": pkg("ead"), "torch": torch.__version__, "transformers": transformers.__version__,
            "math-verify": pkg("math-verify"), "python": platform.python_version()}


def describe_models(pair) -> dict:
    """Source, loaded path, parameter count and sha256 of the local files of each model of the pair. A local
    file source (a .gguf) is hashed itself; a local folder, every file directly in it; a hub id, nothing."""
    out = {}
    for role, m in (("small", pair.small), ("large", pair.large)):
        source = Path(m.source).expanduser()
        target = source if source.is_file() else Path(m.path)
        files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file()) \
            if target.is_dir() else []
        out[role] = {"source": m.source, "path": m.path, "params": m.params,
                     "sha256": {p.name: file_sha256(p) for p in files} or None}
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
