"""Speculative decoding against EAD, large-only and transformers' assisted generation on the real default pair.

Greedy, batch 1, the first --problems GSM8K test questions with the evaluation's prompt, --tokens new tokens
each (end of sequence ignored, so every mode writes the same number). For each mode: tokens/s over all
problems, and for speculation the acceptance rate (accepted / drafted) and tokens per large-model pass; the
speculative outputs are checked against large-only's. transformers' `generate` with `assistant_model` (its
assisted generation, greedy) is the external anchor, beside its plain `generate`. One JSON line per mode on
stdout, a Markdown table on stderr.

    python benchmarks/speculative_speed.py --problems 3 --tokens 64              # CPU, transformers backend
    python benchmarks/speculative_speed.py --device cuda --dtype bfloat16 ...     # GPU, native backend
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import ead
from ead.config import EngineConfig, Role, RouterConfig, SpeculativeConfig
from ead.eval.runs import INSTRUCTION

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--small", default=None)
    p.add_argument("--large", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    pair = ead.load_pair(args.small, args.large, device=args.device, dtype=args.dtype)
    questions = [json.loads(line)["question"] for line in DATA.read_text().splitlines()[: args.problems]]
    prompts = [pair.encode([{"role": "user", "content": f"{q}\n{INSTRUCTION}"}]) for q in questions]
    params = ead.SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    backend = "native" if torch.device(args.device).type == "cuda" else "hf"
    spec = SpeculativeConfig(max_draft_tokens=args.gamma)
    modes = {
        "large only": (RouterConfig(threshold_bits=-float("inf"), min_dwell_tokens=0, start=Role.LARGE), "ead"),
        "small only": (RouterConfig(threshold_bits=float("inf")), "ead"),
        f"EAD tau={args.tau:g}": (RouterConfig(threshold_bits=args.tau), "ead"),
        f"speculative gamma={args.gamma}": (RouterConfig(), "speculative"),
        f"hybrid tau={args.tau:g} gamma={args.gamma}": (RouterConfig(threshold_bits=args.tau), "hybrid"),
    }
    rows, outputs = [], {}
    for name, (cfg, mode) in modes.items():
        engine = ead.Engine(pair, cfg, EngineConfig(backend=backend), mode=mode, speculative=spec)
        engine.generate(prompts[0], ead.SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        results = [engine.generate(ids, params) for ids in prompts]
        sync(args.device)
        seconds = time.perf_counter() - t0
        outputs[name] = [r.token_ids for r in results]
        n = sum(len(r.token_ids) for r in results)
        drafted = sum(r.stats.draft_tokens for r in results)
        passes = sum(r.stats.verify_passes for r in results)
        row = {"mode": name, "tok_per_s": n / seconds, "tokens": n,
               "large_share": sum(r.stats.tokens_large for r in results) / n,
               "acceptance_rate": sum(r.stats.accepted_tokens for r in results) / drafted if drafted else None,
               "tokens_per_large_pass": (sum(r.stats.tokens_large for r in results) / passes) if passes else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows += hf_anchor(pair, prompts, args)
    same = outputs[f"speculative gamma={args.gamma}"] == outputs["large only"]
    large = next(r["tok_per_s"] for r in rows if r["mode"] == "large only")
    print(f"\n{pair.small.source} -> {pair.large.source}, {args.device}, backend {backend}, {args.problems} GSM8K "
          f"problems x {args.tokens} tokens; speculative output == large-only output: {same}\n", file=sys.stderr)
    print("| mode | tok/s | vs large only | large share | acceptance | tokens per large pass |", file=sys.stderr)
    print("| --- | ---: | ---: | ---: | ---: | ---: |", file=sys.stderr)
    for r in rows:
        acc = f"{r['acceptance_rate']:.1%}" if r.get("acceptance_rate") is not None else ""
        per = f"{r['tokens_per_large_pass']:.2f}" if r.get("tokens_per_large_pass") is not None else ""
        share = f"{r['large_share']:.1%}" if r.get("large_share") is not None else ""
        print(f"| {r['mode']} | {r['tok_per_s']:.2f} | {r['tok_per_s'] / large:.2f}x | {share} | {acc} | {per} |",
              file=sys.stderr)


def hf_anchor(pair, prompts, args) -> list[dict]:
    """transformers' own generate, plain and assisted (assistant_model = the small model), greedy."""
    out = []
    large, small = pair.large.model, pair.small.model
    for name, extra in (("transformers generate (large)", {}),
                        ("transformers assisted generation", {"assistant_model": small})):
        def run(ids, n):
            x = torch.tensor([ids], device=large.device)
            return large.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **extra)
        run(prompts[0], 8)
        sync(args.device)
        t0 = time.perf_counter()
        for ids in prompts:
            run(ids, args.tokens)
        sync(args.device)
        row = {"mode": name, "tok_per_s": args.tokens * len(prompts) / (time.perf_counter() - t0)}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    main()
