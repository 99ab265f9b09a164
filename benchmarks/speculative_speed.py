"""Speculative decoding against EAD, large-only and transformers' assisted generation on a real pair.

Greedy, the first --problems GSM8K test questions with the evaluation's prompt, --tokens new tokens each (end of
sequence ignored, so every mode writes the same number), --batch rows at a time. For each mode: tokens/s over
all problems (the fastest of --repeats runs), the large model's share of tokens, and for speculation the
acceptance rate (accepted / drafted), accepted draft tokens and tokens per large-model pass; the speculative
outputs are checked against large-only's.
EAD and hybrid run the paper's rule at each --taus value. With transformers models (backends hf and native),
transformers' `generate` with `assistant_model` (its assisted generation, greedy, batch 1) is the external
anchor, beside its plain `generate`. The measuring is `ead.bench_speculation`, shared with `ead bench`. One JSON
line per mode on stdout, a Markdown table on stderr.

    python benchmarks/speculative_speed.py --backend llamacpp --problems 5 --tokens 128 --taus 0.5,1.0   # CPU
    python benchmarks/speculative_speed.py --problems 3 --tokens 64              # CPU, transformers backend
    python benchmarks/speculative_speed.py --device cuda --dtype bfloat16 ...     # GPU, native backend
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import ead
from ead.bench_speculation import (SpeculationMode, gsm8k_prompts, hf_generate_rows, is_transformers, markdown,
                                   run_modes)
from ead.config import EngineConfig, RouterConfig, SpeculativeConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--draft-confidence", type=float, default=None,
                   help="also a speculative row with this adaptive draft length")
    p.add_argument("--taus", default="0.5", help="comma-separated taus for the EAD and hybrid rows")
    p.add_argument("--batch", type=int, default=1, help="rows in flight at once")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each mode; the table keeps the fastest")
    p.add_argument("--backend", default=None, help="default: native on cuda, else hf; llamacpp runs the GGUF files")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--small", default=None)
    p.add_argument("--large", default=None)
    p.add_argument("--no-hf", dest="hf", action="store_false",
                   help="leave out transformers' plain and assisted generate rows (slow: eager, batch 1)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    backend = args.backend or ("native" if torch.device(args.device).type == "cuda" else "hf")
    pair = ead.load_pair(args.small, args.large, device=args.device, dtype=args.dtype, backend=backend, progress=False)
    prompts = gsm8k_prompts(pair, args.problems)
    taus = [float(t) for t in args.taus.split(",") if t]
    spec = SpeculativeConfig(args.gamma)
    modes = [SpeculationMode("large only"),
             SpeculationMode("small only", router=RouterConfig(threshold_bits=float("inf"))),
             *(SpeculationMode(f"EAD tau={t:g}", router=RouterConfig(threshold_bits=t)) for t in taus),
             SpeculationMode(f"speculative gamma={args.gamma}", "speculative", speculative=spec)]
    if args.draft_confidence is not None:
        modes.append(SpeculationMode(f"speculative gamma={args.gamma} confidence={args.draft_confidence:g}",
                                     "speculative", speculative=SpeculativeConfig(args.gamma, args.draft_confidence)))
    modes += [SpeculationMode(f"hybrid tau={t:g} gamma={args.gamma}", "hybrid", RouterConfig(threshold_bits=t), spec)
              for t in taus]
    label = {"pair": ("default pair" if args.small is None else f"{Path(args.small).name} -> {Path(args.large).name}")
             + f", {backend}"}

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    rows = run_modes(pair, prompts, args.tokens, modes, EngineConfig(backend=backend), args.batch, label, emit,
                     args.repeats)
    if args.hf and is_transformers(pair.large.model):
        for row in hf_generate_rows(pair, prompts, args.tokens):
            row = {**label, **row, "vs_large_only": row["tok_per_s"] / rows[0]["tok_per_s"]}
            rows.append(row)
            emit(row)
    command = " ".join(["python", "benchmarks/speculative_speed.py", *sys.argv[1:]])
    print(f"\n{pair.small.source} -> {pair.large.source}, {args.device} ({platform.machine()}, {os.cpu_count()} "
          f"cores, load average {os.getloadavg()[0]:.1f}), backend {backend}, {args.problems} GSM8K problems x "
          f"{args.tokens} tokens, batch {args.batch}, {time.strftime('%Y-%m-%d')}; `{command}`\n", file=sys.stderr)
    print(markdown(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
