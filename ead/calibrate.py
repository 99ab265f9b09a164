"""Calibration: the static tau at which the large model writes a target share of the tokens on a set of prompts,
saved as JSON for one model pair, and `ead calibrate`, the subcommand that makes that file.

Method (an approximation, chosen so one pass over the prompts serves every candidate tau):

1. Record: for each prompt the small model writes its greedy answer alone (tau = inf); then each model reads the
   prompt plus that answer in one forward pass (teacher forcing), which gives both models' signals at every
   generated position.
2. Replay: the rule (`ead.routing.SignalRouter`) routes each recorded answer offline, reading token t's signal from
   the model it has active at t, exactly as EAD would if the text were the same.
3. Choose: of a dense grid of candidate thresholds (halfway between the rolling means the two recorded streams
   take), the one whose replayed share, pooled over all tokens of the set, is closest to the target; among
   equally close ones, the median, away from the edges of the plateau.

Bias: the replay keeps the small model's text. In a real run the large model writes its own tokens, which
change what follows (usually less hesitant text, so fewer hard positions later) and the length of the answer.
Because the signal at each position comes from the model that would be active, the feedback on the mean (the
large model is usually more certain, so it hands back sooner) is modelled; only the change of text is not, and it
tends to make the real share somewhat *lower* than the replayed one, i.e. the calibrated tau under-spends. `--check`
runs real EAD at the chosen tau on the same prompts and records the share it gives, which measures this bias.

What the file holds, and the pair identity `load_calibration` checks, are documented on `save_calibration`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ead.config import Role
from ead.errors import ConfigError
from ead.router import RollingMean, TokenSignals, token_signals
from ead.routing import SIGNALS, BudgetConfig, RoutingConfig, SignalRouter, difficulty

CALIBRATION_FORMAT = 1
# Appended to the default GSM8K questions only, as in benchmarks/choose_tau.py; a user's prompts are used as given.
GSM8K_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
MAX_CANDIDATES = 400  # thresholds replayed; each replay walks every recorded token once


@dataclass(frozen=True)
class RecordedStream:
    """One prompt's signals along the small model's greedy answer: `small[t]` and `large[t]` are each model's
    signals for the distribution of generated token t (raw logits, temperature 1)."""

    small: list[TokenSignals]
    large: list[TokenSignals]


@dataclass(frozen=True)
class Calibration:
    """The chosen threshold (in the signal's difficulty units) and the replayed share it gives on the set."""

    threshold: float
    target_large_share: float
    large_share: float          # pooled: large-model tokens / all tokens of the set
    mean_prompt_large_share: float
    tokens: int
    prompts: int


# ---- replay and choice: plain floats, no models ----

def replay(streams: list[RecordedStream], cfg: RoutingConfig) -> tuple[int, int, list[float]]:
    """Route each recorded stream with the static rule `cfg` (its budget, if any, is ignored), reading token t's
    signals from the model active at t. Returns (large-model tokens, tokens, per-stream large share)."""
    large = total = 0
    shares = []
    for s in streams:
        router = SignalRouter(cfg)
        for a, b in zip(s.small, s.large, strict=True):
            router.observe(b if router.active is Role.LARGE else a)
        large, total = large + router.large_tokens, total + router.tokens
        shares.append(router.large_share)
    return large, total, shares


def candidate_thresholds(streams: list[RecordedStream], cfg: RoutingConfig) -> list[float]:
    """Sorted thresholds to try: halfway between consecutive values the rolling mean of difficulty takes along
    each model's own stream (at most MAX_CANDIDATES values, evenly by rank, clamped to the signal's range), so
    that no candidate sits exactly on a mean the rule compares it with; then below the smallest (half of it) and
    +inf (never large)."""
    top = SIGNALS[cfg.signal][3] or math.inf
    means = set()
    for s in streams:
        for signals in (s.small, s.large):
            window = RollingMean(cfg.window_tokens)
            means.update(min(max(window.push(difficulty(x, cfg.signal)), 0.0), top) for x in signals)
    m = sorted(means)
    if len(m) > MAX_CANDIDATES:
        step = (len(m) - 1) / (MAX_CANDIDATES - 1)
        m = sorted({m[round(i * step)] for i in range(MAX_CANDIDATES)})
    return [m[0] / 2] + [(a + b) / 2 for a, b in itertools.pairwise(m)] + [math.inf]


def choose_threshold(streams: list[RecordedStream], large_share: float, cfg: RoutingConfig) -> Calibration:
    """The candidate threshold whose replayed pooled share is closest to `large_share` (see the module docstring).
    `cfg` gives the signal, window, dwell and start; its thresholds and budget are replaced by each candidate."""
    return choose_thresholds(streams, [large_share], cfg)[0]


def choose_thresholds(streams: list[RecordedStream], large_shares: list[float],
                      cfg: RoutingConfig) -> list[Calibration]:
    """choose_threshold for each target of `large_shares`, in order, from one replay per candidate threshold."""
    for f in large_shares:
        BudgetConfig(f)  # validates the target
    if not any(s.small for s in streams):
        raise ConfigError("no tokens were recorded (every answer was empty); use more prompts or --max-new-tokens")
    replays = []  # (tau, pooled share, tokens, per-prompt shares), sorted by tau as the candidates are
    for tau in candidate_thresholds(streams, cfg):
        n_large, n, shares = replay(streams, static_rule(cfg, tau))
        replays.append((tau, n_large / n, n, shares))
    out = []
    for f in large_shares:
        best_error = min(abs(share - f) for _, share, _, _ in replays)
        best = [r for r in replays if abs(r[1] - f) <= best_error + 1e-12]
        tau, share, n, shares = best[len(best) // 2]  # the median of equally close ones, away from the plateau's edges
        out.append(Calibration(threshold=tau, target_large_share=f, large_share=share,
                               mean_prompt_large_share=statistics.mean(shares), tokens=n, prompts=len(streams)))
    return out


def static_rule(cfg: RoutingConfig, tau: float) -> RoutingConfig:
    """`cfg` as the paper's rule at threshold `tau`: no hysteresis, no budget."""
    return dataclasses.replace(cfg, threshold=tau, threshold_down=None, budget=None)


# ---- recording on the real pair ----

def record_streams(pair, prompts: list, max_new_tokens: int, progress=None, batch: int = 1) -> list[RecordedStream]:
    """For each prompt (plain text or chat messages): the small model's greedy answer, then both models'
    signals along it by teacher forcing. `progress(i, n_prompts, n_tokens)` is called after each prompt.
    `batch` > 1 writes the answers that many at a time (ead.engine.BatchEngine): the same greedy answers up to
    rounding, in a fraction of the time on a GPU."""
    from ead.config import RouterConfig
    from ead.engine import BatchEngine, Engine
    from ead.sampling import SamplingParams

    ids_list = [pair.encode(prompt) for prompt in prompts]
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    small_only = RouterConfig(threshold_bits=math.inf)
    if batch > 1:
        engine = BatchEngine(pair, small_only, max_batch=batch)
        answers = [r.token_ids for r in engine.generate_many(ids_list, sampling)]
    else:
        engine = Engine(pair, small_only)
        answers = (engine.generate(ids, sampling).token_ids for ids in ids_list)  # one at a time, as recorded
    vocab = min(pair.small.model.config.vocab_size, pair.large.model.config.vocab_size)  # as the engine trims
    streams = []
    for i, (ids, answer) in enumerate(zip(ids_list, answers)):
        full = ids + answer
        streams.append(RecordedStream(small=teacher_forced_signals(pair.small.model, full, len(ids), vocab),
                                      large=teacher_forced_signals(pair.large.model, full, len(ids), vocab)))
        if progress is not None:
            progress(i, len(prompts), len(answer))
    return streams


@torch.inference_mode()
def teacher_forced_signals(model, ids: list[int], n_prompt: int, vocab: int) -> list[TokenSignals]:
    """Signals of the distributions `model` gives each generated token ids[n_prompt:], from one forward pass over
    `ids`: position p's logits predict token p + 1. Logits are trimmed to `vocab` as the runners trim them."""
    if len(ids) <= n_prompt:
        return []
    x = torch.tensor([ids], device=model.device)
    logits = model(x).logits[0, n_prompt - 1: len(ids) - 1, :vocab]  # (T_generated, V)
    return [TokenSignals.from_values(row) for row in token_signals(logits).tolist()]


# ---- the file: pair identity, save, load ----

def model_identity(m) -> dict:
    """What identifies one loaded model (ead.models.sources.LoadedModel): its source as given, its parameter
    count, and the sha256 of its weights where they are local files (a .gguf source: that file; a folder: every
    weights file in it, combined), else None (a hub id: the hub revision when it is in the local HF cache)."""
    source = Path(m.source).expanduser()
    ident = {"source": m.source, "params": m.params, "sha256": None, "revision": None}
    if source.is_file():
        ident["sha256"] = file_sha256(source)
    elif source.is_dir():
        ident["sha256"] = folder_sha256(source)
    else:
        ident["revision"] = _hub_revision(m.source)
    return ident


def pair_identity(pair) -> dict:
    return {"small": model_identity(pair.small), "large": model_identity(pair.large)}


def file_sha256(path: Path) -> str:
    """sha256 of a file, hex. The default pair's cache keeps a verified digest beside each file (size and mtime
    recorded, see ead.models.default_pair); it is reused when both still match, to skip 1.6 GB of hashing."""
    st = path.stat()
    try:
        marker = json.loads(path.with_name(path.name + ".verified.json").read_text())
        if marker.get("size_bytes") == st.st_size and marker.get("mtime_ns") == st.st_mtime_ns:
            return str(marker["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str | None:
    """sha256 over the weights files of a model folder: of the lines 'name sha256' of each, sorted by name."""
    files = sorted(p for ext in ("*.safetensors", "*.bin", "*.gguf", "*.pt") for p in folder.glob(ext))
    if not files:
        return None
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def _hub_revision(hub_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True)).name  # snapshots/<commit>
    except (ImportError, OSError, ValueError):  # not cached, not a hub id: no revision to record
        return None


def save_calibration(path: Path, cal: Calibration, pair: dict, settings: dict, extra: dict | None = None) -> dict:
    """Write the calibration as JSON and return what was written: `tau` (the threshold, in the signal's
    difficulty units), the target and replayed shares, `pair` (pair_identity) and `settings` (signal, window,
    d_min, start, prompts, ...), which `load_calibration` checks before it hands tau out."""
    record = {"ead_calibration": CALIBRATION_FORMAT, "tau": cal.threshold,
              "target_large_share": cal.target_large_share, "large_share": cal.large_share,
              "mean_prompt_large_share": cal.mean_prompt_large_share, "tokens": cal.tokens, "prompts": cal.prompts,
              "method": "replay of the rule on both models' teacher-forced signals along the small model's "
                        "greedy answers (ead/calibrate.py)",
              "pair": pair, "settings": settings,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    record |= extra or {}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_calibration(path: str | Path) -> tuple[float, dict, dict]:
    """(tau, the pair it was made for, its settings) from a file `ead calibrate` wrote, unchecked: use
    load_calibration once the pair is loaded."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        return float(record["tau"]), record["pair"], record["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a calibration file ead can read ({type(e).__name__}: {e}); make one "
                          "with `ead calibrate --large-share 0.25 --out FILE`") from None


def load_calibration(path: str | Path, pair, routing: RoutingConfig | None = None) -> float:
    """tau from a file `ead calibrate` wrote, after checking it was made for this `pair` (a loaded ModelPair)
    and, when `routing` is given, with its signal, window, d_min and start. Raises ConfigError otherwise."""
    path = Path(path)
    tau, made_for, settings = read_calibration(path)
    here = pair_identity(pair)
    for role in ("small", "large"):
        if not _same_model(made_for[role], here[role]):
            raise ConfigError(
                f"{path} was calibrated for {made_for['small']['source']} -> {made_for['large']['source']}, but the "
                f"{role} model here is {here[role]['source']} ({_describe(here[role])} vs {_describe(made_for[role])});"
                f" a tau does not carry over between pairs. Run `ead calibrate` with this pair")
    if routing is not None:
        want = {"signal": routing.signal, "window_tokens": routing.window_tokens,
                "min_dwell_tokens": routing.min_dwell_tokens, "start": routing.start.value}
        diff = {k: (settings.get(k), v) for k, v in want.items() if settings.get(k) != v}
        if diff:
            shown = ", ".join(f"{k} {a!r} (here {b!r})" for k, (a, b) in diff.items())
            raise ConfigError(f"{path} was calibrated with {shown}; use the calibrated settings or calibrate again")
    return tau


def _same_model(a: dict, b: dict) -> bool:
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    if a.get("sha256") or b.get("sha256"):
        return False  # local weights on one side only
    return a.get("source") == b.get("source") and a.get("params") == b.get("params") and (
        a.get("revision") == b.get("revision") or None in (a.get("revision"), b.get("revision")))


def _describe(ident: dict) -> str:
    if ident.get("sha256"):
        return f"sha256 {ident['sha256'][:12]}"
    return f"{ident.get('params')} params" + (f", revision {ident['revision'][:12]}" if ident.get("revision") else "")


# ---- prompts ----

def default_data_file(repo_root: Path | None = None, data_dir: str | None = None) -> Path:
    """GSM8K train (the calibration split): `data_dir` (the CLI passes $EAD_DATA_DIR) or ../shared/data beside
    the repository."""
    root = Path(data_dir) if data_dir else (repo_root or Path(__file__).resolve().parents[1]).parent / "shared" / "data"
    return root / "gsm8k_train.jsonl"


def load_prompts(path: Path, limit: int | None = None) -> list[str]:
    """The first `limit` prompts of a file: JSONL objects with a 'question', 'prompt' or 'problem' key, or plain
    text with one prompt a line (blank lines skipped). JSONL is recognised by a .jsonl/.json suffix or a first
    line that starts with '{'."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read calibration prompts from {path}: {e.strerror}; pass --data FILE (JSONL with a "
                          "'question' or 'prompt' key, or one prompt a line)") from None
    lines = lines[:limit] if limit is not None else lines
    if not (Path(path).suffix in (".jsonl", ".json") or (lines and lines[0].lstrip().startswith("{"))):
        return lines
    prompts = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            prompts.append(next(row[k] for k in ("question", "prompt", "problem") if isinstance(row.get(k), str)))
        except (ValueError, StopIteration, AttributeError):
            raise ConfigError(f"{path} line {i} is not a JSON object with a string 'question', 'prompt' or "
                              "'problem'; fix the line, or give a text file with one prompt a line") from None
    return prompts


# ---- the subcommand ----

def register(subparsers: argparse._SubParsersAction) -> None:
    from ead.cli import add_model_args
    from ead.config import DEFAULT_MIN_DWELL_TOKENS, DEFAULT_WINDOW_TOKENS

    p = subparsers.add_parser(
        "calibrate", help="choose tau for a target large-model share on a set of prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pick the static tau at which the large model writes a target share of the tokens, on GSM8K "
                    "train questions or your prompts, and save it with the pair's identity for "
                    "`ead generate --calibration FILE` and `ead eval --calibration FILE`. One small-model pass per "
                    "prompt plus one forward pass of each model; the rule is then replayed offline for every "
                    "candidate tau, so several signals and targets cost one recording.",
        epilog="examples:\n  ead calibrate --large-share 0.25 --limit 16 --out calibration.json\n"
               "  ead calibrate --signal entropy,varentropy,top1,margin --large-share 0.1,0.25 --batch 16 "
               "--out-dir cal/\n      # cal/entropy-f0.1.json, cal/entropy-f0.25.json, ..., one recording")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--large-share", metavar="F[,F...]",
                        help="target share(s) of tokens written by the large model, e.g. 0.25 or 0.1,0.25")
    target.add_argument("--cost-ratio", metavar="C[,C...]",
                        help="target paper cost(s) ((1-f) P_small + f P_large) / P_large")
    add_model_args(p)
    p.add_argument("--data", default=None, help="prompts: JSONL with a 'question' or 'prompt' key, or one prompt a "
                                                "line (default: GSM8K train from $EAD_DATA_DIR or ../shared/data)")
    p.add_argument("--limit", type=int, default=16, help="use the first N prompts (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=320, help="answer length per prompt (default 320)")
    p.add_argument("--out", default="ead-calibration.json", help="where to write the JSON, for one signal and one "
                                                                 "target (default ead-calibration.json)")
    p.add_argument("--out-dir", metavar="DIR", default=None,
                   help="write one file per signal and target instead, DIR/<signal>-f<share>.json")
    p.add_argument("--signal", default="entropy", metavar="S[,S...]",
                   help=f"routing signal(s): {', '.join(SIGNALS)} (default entropy)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW_TOKENS, help="tokens in the rolling mean")
    p.add_argument("--d-min", type=int, default=DEFAULT_MIN_DWELL_TOKENS, help="tokens before another switch")
    p.add_argument("--start", choices=["small", "large"], default="small", help="model that writes first")
    p.add_argument("--batch", type=int, default=1, help="small-model answers written together (default 1)")
    p.add_argument("--raw", action="store_true", help="use prompts as given, without the chat template")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--check", action="store_true", help="then run real EAD at the chosen tau on the same prompts "
                                                        "and record its share (doubles the time, per file)")
    p.set_defaults(handler=cmd_calibrate)


def _list(text: str, flag: str, cast=float) -> list:
    try:
        values = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, e.g. 0.1,0.25; got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} is empty; e.g. {flag} 0.25")
    return list(dict.fromkeys(values))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ead.cli import load

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    signals = _list(args.signal, "--signal", str)
    rules = [RoutingConfig(signal=sig, threshold=math.inf, window_tokens=args.window, min_dwell_tokens=args.d_min,
                           start=Role(args.start)) for sig in signals]  # fails on an unknown signal before loading
    targets = _list(args.large_share or args.cost_ratio, "--large-share" if args.large_share else "--cost-ratio")
    if args.large_share is not None:
        for f in targets:
            BudgetConfig(f)  # fail on a bad target before loading models
    if len(signals) * len(targets) > 1 and args.out_dir is None:
        raise ConfigError(f"{len(signals)} signals x {len(targets)} targets make {len(signals) * len(targets)} files; "
                          "say where they go with --out-dir DIR (one DIR/<signal>-f<share>.json each)")
    data = Path(args.data) if args.data else default_data_file(data_dir=os.environ.get("EAD_DATA_DIR"))
    texts = load_prompts(data, args.limit)
    if not texts:
        raise ConfigError(f"{data} holds no prompts; pass --data FILE")
    suffix = GSM8K_INSTRUCTION if args.data is None else ""
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [t + suffix if args.raw else system + [{"role": "user", "content": t + suffix}] for t in texts]

    pair = load(args)
    shares = targets if args.large_share is not None else [
        BudgetConfig.for_cost_ratio(c, pair.small.params, pair.large.params).large_share for c in targets]

    def progress(i: int, n: int, tokens: int) -> None:
        print(f"prompt {i + 1}/{n}: {tokens} tokens", file=sys.stderr)

    streams = record_streams(pair, prompts, args.max_new_tokens, progress, batch=max(1, args.batch))
    identity, costs = pair_identity(pair), targets if args.cost_ratio is not None else [None] * len(shares)
    for rule in rules:
        for cal, cost in zip(choose_thresholds(streams, shares, rule), costs):
            settings = {"signal": rule.signal, "window_tokens": args.window, "min_dwell_tokens": args.d_min,
                        "start": args.start, "data": str(data), "limit": args.limit,
                        "max_new_tokens": args.max_new_tokens, "chat_template": not args.raw, "system": args.system,
                        "prompt_suffix": suffix, "sampling": "greedy"}
            extra = {"target_cost_ratio": cost}
            if args.check:
                extra["checked_large_share"] = check_share(pair, prompts, args.max_new_tokens,
                                                           static_rule(rule, cal.threshold))
            out = Path(args.out_dir) / f"{rule.signal}-f{cal.target_large_share:.4g}.json" if args.out_dir \
                else Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            save_calibration(out, cal, identity, settings, extra)
            checked = f", real EAD {extra['checked_large_share']:.1%}" if args.check else ""
            print(f"{rule.signal} tau {cal.threshold:.4g}: large share {cal.large_share:.1%} replayed on "
                  f"{cal.prompts} prompts, {cal.tokens} tokens (target {cal.target_large_share:.1%}{checked}); "
                  f"wrote {out}")
    return 0


def check_share(pair, prompts: list, max_new_tokens: int, cfg: RoutingConfig) -> float:
    """The pooled large share of real EAD runs under `cfg` (greedy) on `prompts`."""
    from ead.engine import Engine
    from ead.routing import make_router
    from ead.sampling import SamplingParams

    engine = Engine(pair)
    large = total = 0
    for prompt in prompts:
        s = engine.generate(pair.encode(prompt), SamplingParams(max_new_tokens=max_new_tokens),
                            router=make_router(cfg)).stats
        large, total = large + s.tokens_large, total + s.tokens_small + s.tokens_large
    return large / total if total else 0.0
