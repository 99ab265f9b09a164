"""How much faster is the llama.cpp backend than transformers on a CPU? The default pair, small only, large only
and EAD, on one GSM8K question, greedy, a fixed number of new tokens.

Each backend runs in its own process (so peak RSS is that backend's): one JSON object per run on stdout, then a
Markdown table of the best of `--repeats` runs. `tok_per_s` is wall-clock for the whole generation, prefill
and catch-up included (the engine's `tokens_per_s`); `decode_tok_per_s` is 1000 / the median step of the steps
that fed one token. Each process first generates 8 tokens with each model to warm up (not timed). On a shared
machine other processes make runs slow at random (2-9x on 2 busy cores), so the table takes the fastest run of
each scenario, as timeit takes the minimum; every run is in the JSON lines. `multi_token_*` sum the calls that
fed more than one token (prefill and catch-up), whose cost EAD adds to the two decode rates.

    python benchmarks/llamacpp_speed.py --max-new-tokens 128 > runs/llamacpp_speed.txt
    python benchmarks/llamacpp_speed.py --from-jsonl runs/llamacpp_speed.txt   # the table again, from the lines
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
BACKENDS = ("llamacpp", "hf")


def scenarios(tau_bits: float):
    import ead

    return {"small only": ead.RouterConfig(threshold_bits=math.inf),
            "large only": ead.RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=ead.Role.LARGE),
            f"EAD tau {tau_bits}": ead.RouterConfig(threshold_bits=tau_bits)}


def run_backend(backend: str, args: argparse.Namespace) -> None:
    """Load the default pair for `backend`, warm up, and print one JSON object per run."""
    import ead

    t0 = time.perf_counter()
    pair = ead.load_pair(device="cpu", backend=backend, progress=False)
    load_s = time.perf_counter() - t0
    row = json.loads(DATA.read_text().splitlines()[args.question])
    prompt = pair.encode([{"role": "user", "content": row["question"] + INSTRUCTION}])
    sampling = ead.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    engine_cfg = ead.EngineConfig(backend=backend)
    for repeat in range(args.repeats):
        for name, cfg in scenarios(args.tau).items():
            engine = ead.Engine(pair, cfg, engine_cfg)
            if repeat == 0 and name != f"EAD tau {args.tau}":  # warm-up: first calls pay page faults, allocation
                engine.generate(prompt, ead.SamplingParams(max_new_tokens=8, ignore_eos=True))
            print(json.dumps(measure(engine, prompt, sampling, backend, name, load_s)), flush=True)


def measure(engine, prompt: list[int], sampling, backend: str, name: str, load_s: float) -> dict:
    import torch

    res = engine.generate(prompt, sampling)
    s = res.stats
    decode_ms = statistics.median(st.step_ms for st in res.trace.steps if st.fed_tokens == 1)
    batched = [st for st in res.trace.steps if st.fed_tokens > 1]  # prefill and catch-up: many tokens a call
    return {"backend": backend, "scenario": name, "new_tokens": len(res.token_ids), "prompt_tokens": len(prompt),
            "seconds": s.seconds, "tok_per_s": s.tokens_per_s, "decode_tok_per_s": 1e3 / decode_ms,
            "large_token_share": s.large_share, "switches": s.switches, "catchup_tokens": s.catchup_tokens,
            "multi_token_calls": len(batched), "multi_token_fed": sum(st.fed_tokens for st in batched),
            "multi_token_s": sum(st.step_ms for st in batched) / 1e3, "load_s": load_s, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "torch_threads": torch.get_num_threads(), "text_head": res.text[:60]}


def cell(r: dict | None) -> str:
    return f"{r['tok_per_s']:.1f} ({r['decode_tok_per_s']:.1f})" if r else "-"


def table(runs: list[dict]) -> str:
    by = {}
    for key in dict.fromkeys((r["backend"], r["scenario"]) for r in runs):
        by[key] = max((r for r in runs if (r["backend"], r["scenario"]) == key), key=lambda r: r["tok_per_s"])
    lines = ["| scenario | llamacpp tok/s (decode) | hf tok/s (decode) | speed-up | large share (llamacpp / hf) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in dict.fromkeys(r["scenario"] for r in runs):
        a, b = by.get(("llamacpp", name)), by.get(("hf", name))
        speedup = f"{a['tok_per_s'] / b['tok_per_s']:.1f}x" if a and b else "-"
        share = " / ".join(f"{r['large_token_share']:.2f}" if r else "-" for r in (a, b))
        lines.append(f"| {name} | {cell(a)} | {cell(b)} | {speedup} | {share} |")
    lines += ["", "| backend | load s | peak RSS GiB | torch threads |", "| --- | ---: | ---: | ---: |"]
    for backend in dict.fromkeys(r["backend"] for r in runs):
        mine = [r for r in runs if r["backend"] == backend]
        rss = max(r["peak_rss_gib"] for r in mine)
        lines.append(f"| {backend} | {mine[0]['load_s']:.1f} | {rss:.2f} | {mine[0]['torch_threads']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--question", type=int, default=0, help="line of gsm8k_train.jsonl (default: the first)")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="runs of each scenario; the table shows the fastest")
    p.add_argument("--from-jsonl", metavar="FILE", help="print the table of the JSON lines in FILE and exit")
    p.add_argument("--one", choices=BACKENDS, help=argparse.SUPPRESS)  # the child process: one backend
    args = p.parse_args()
    if args.one:
        run_backend(args.one, args)
        return
    if args.from_jsonl:
        lines = Path(args.from_jsonl).read_text().splitlines()
        print(table([json.loads(line) for line in lines if line.startswith("{")]))
        return
    runs = []
    for backend in args.backends:
        child = [sys.executable, __file__, "--one", backend, "--max-new-tokens", str(args.max_new_tokens),
                 "--question", str(args.question), "--tau", str(args.tau), "--repeats", str(args.repeats)]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            print(line, flush=True)
            runs.append(json.loads(line))
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; `{' '.join(['python', 'benchmarks/llamacpp_speed.py'] + sys.argv[1:])}`\n")
    print(table(runs))


if __name__ == "__main__":
    main()
