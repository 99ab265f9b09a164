"""Speculative decoding and EAD + speculation against large-only and EAD, on a real pair and real prompts: the
rows `ead bench` adds for real models, and what benchmarks/speculative_speed.py prints.

Owns: the prompts (GSM8K test questions with the evaluation's instruction, as `ead eval` writes them), one
timed run per `SpeculationMode` through one BatchEngine, the speculation numbers of each run (acceptance rate =
accepted / drafted draft tokens, accepted draft tokens per large-model pass, tokens per large-model pass), the
check that speculation wrote the large-only text, and transformers' own `generate`, plain and assisted
(`assistant_model`), as the external anchor. Leaves to others: routing and speculation themselves
(`ead.engine`, `ead.speculative`), random-weight shapes and the EAD-only rows (`ead.bench`).

Random weights are no use here: acceptance measures how often the small model guesses the large one's greedy
token, which two random models do about never, so `ead bench` skips these rows for random shapes.

Greedy, end of sequence ignored, so every mode writes the same number of tokens; tokens/s is wall-clock over
all prompts (prefill included), after an untimed warm-up of 8 tokens in the same engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ead.config import EngineConfig, Role, RouterConfig, SpeculativeConfig
from ead.router import ScriptedRouter
from ead.sampling import SamplingParams

LARGE_ONLY = RouterConfig(threshold_bits=-float("inf"), min_dwell_tokens=0, start=Role.LARGE)


@dataclass(frozen=True)
class SpeculationMode:
    """One row: the engine's `mode` with its drafting, and either the EAD rule `router` or, with `scripts`,
    fixed roles per prompt (ead bench's scripted shares, `ScriptedRouter.of_rule`)."""

    name: str
    mode: str = "ead"
    router: RouterConfig = LARGE_ONLY
    speculative: SpeculativeConfig | None = None
    scripts: tuple[tuple[Role, ...], ...] | None = None

    def routers(self, n: int) -> list[ScriptedRouter] | None:
        return None if self.scripts is None else [ScriptedRouter.of_rule(list(self.scripts[i])) for i in range(n)]


def gsm8k_prompts(pair, n: int, data_dir: Path | None = None) -> list[list[int]]:
    """The first `n` GSM8K test questions as `ead eval` prompts them (chat template, question, instruction)."""
    from ead.eval.datasets import load_dataset
    from ead.eval.runs import INSTRUCTION

    problems = load_dataset("gsm8k", data_dir).problems[:n]
    return [pair.encode([{"role": "user", "content": f"{p.question}\n\n{INSTRUCTION}"}]) for p in problems]


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(pair, prompts: list[list[int]], tokens: int, m: SpeculationMode, engine_cfg: EngineConfig,
             max_batch: int = 1, repeats: int = 1) -> tuple[dict, list[list[int]]]:
    """Every prompt to `tokens` new tokens through one BatchEngine of `max_batch` slots in mode `m`, `repeats`
    times, keeping the fastest run (on a shared machine other processes slow runs down at random, as timeit
    takes the minimum). Returns the row (tok_per_s, large_share and the speculation numbers, None without
    speculation; `runs_s` every run's seconds) and the token ids."""
    from ead.engine import BatchEngine

    engine = BatchEngine(pair, m.router, engine_cfg, max_batch=max_batch, mode=m.mode, speculative=m.speculative)
    engine.warm_up(max(len(p) for p in prompts) + tokens + 1)  # CUDA graphs, native backend only
    engine.generate_many(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True), m.routers(1))  # untimed
    runs = []
    for _ in range(repeats):
        sync(pair.device)
        t0 = time.perf_counter()
        results = engine.generate_many(prompts, SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                                       m.routers(len(prompts)))
        sync(pair.device)
        runs.append(time.perf_counter() - t0)
    del engine
    seconds = min(runs)
    n = sum(len(r.token_ids) for r in results)
    passes, drafted, accepted, emitted = (sum(getattr(r.stats, k) for r in results) for k in
                                          ("verify_passes", "draft_tokens", "accepted_tokens", "tokens_large"))
    row = {"mode": m.name, "engine_mode": m.mode, "rows": len(prompts), "batch": max_batch, "tokens": n,
           "seconds": seconds, "tok_per_s": n / seconds, "runs_s": [round(x, 3) for x in runs],
           "large_share": emitted / n, "gamma": m.speculative.max_draft_tokens if m.speculative else None,
           "draft_confidence": m.speculative.draft_confidence if m.speculative else None,
           "verify_passes": passes, "draft_tokens": drafted, "accepted_tokens": accepted,
           "acceptance_rate": accepted / drafted if drafted else None,
           "accepted_per_pass": accepted / passes if passes else None,
           "tokens_per_large_pass": emitted / passes if passes else None}
    return row, [r.token_ids for r in results]


def run_modes(pair, prompts: list[list[int]], tokens: int, modes: list[SpeculationMode], engine_cfg: EngineConfig,
              max_batch: int = 1, label: dict | None = None, emit: Callable[[dict], None] = print,
              repeats: int = 1) -> list[dict]:
    """`modes` in turn on the same prompts (see run_mode), the first being large-only: the reference of each
    row's speed (`vs_large_only`) and of speculative rows' text (`rows_same_as_large_only`). Each row goes to
    `emit` as it is measured; returns them all."""
    rows, reference = [], None
    for m in modes:
        row, outputs = run_mode(pair, prompts, tokens, m, engine_cfg, max_batch, repeats)
        row = {**(label or {}), **row}
        if reference is None:
            reference = (row["tok_per_s"], outputs)
        row["vs_large_only"] = row["tok_per_s"] / reference[0]
        if m.mode == "speculative":
            compare_outputs(row, outputs, reference[1], pair, prompts, engine_cfg)
        rows.append(row)
        emit(row)
    return rows


def compare_outputs(row: dict, outputs: list[list[int]], reference: list[list[int]], pair, prompts: list[list[int]],
                    engine_cfg: EngineConfig) -> None:
    """Add to `row` how many of its rows wrote the reference's (large-only's) tokens exactly, where the first one
    that did not parted from it, and for each row that parted `logit_gaps_at_differences`: the large model's
    logit of large-only's token minus that of this row's, after their common prefix read in one pass by a fresh
    runner of the same backend. On llama.cpp, whose logits depend on batching, rows part at near-ties (gaps of
    hundredths of a logit); a gap of whole logits would be a bug."""
    from ead.runner import build_batch_runner, choose_backend

    same = [a == b for a, b in zip(outputs, reference)]
    row["rows_same_as_large_only"] = f"{sum(same)}/{len(same)}"
    parted = [(i, next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
              for i, (a, b, ok) in enumerate(zip(outputs, reference, same)) if not ok]
    row["first_difference_at_token"] = min(k for _, k in parted) if parted else None
    if not parted:
        return
    model = pair.large.model
    backend = choose_backend([pair.small.model, model], engine_cfg.backend, pair.device)
    runner = build_batch_runner(model, model.config.vocab_size, backend, engine_cfg, 1)
    gaps = []
    for i, k in parted:
        if k == min(len(outputs[i]), len(reference[i])):  # one stopped earlier: no token to compare
            continue
        runner.reset(0)
        logits = runner.feed_many([0], [prompts[i] + reference[i][:k]])[0]
        gaps.append(round(float(logits[reference[i][k]] - logits[outputs[i][k]]), 3))
    row["logit_gaps_at_differences"] = gaps


def hf_generate_rows(pair, prompts: list[list[int]], tokens: int) -> list[dict]:
    """transformers' greedy `generate` of the large model at batch 1, plain and assisted by the small model
    (its own speculative decoding, `assistant_model`), over the same prompts; only for transformers models."""
    large, small = pair.large.model, pair.small.model
    rows = []
    for name, extra in (("transformers generate (large)", {}),
                        ("transformers assisted generation", {"assistant_model": small})):
        def generate(ids: list[int], n: int, extra: dict = extra) -> None:
            x = torch.tensor([ids], device=large.device)
            large.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **extra)

        generate(prompts[0], 8)  # warm-up
        sync(pair.device)
        t0 = time.perf_counter()
        for ids in prompts:
            generate(ids, tokens)
        sync(pair.device)
        seconds = time.perf_counter() - t0
        rows.append({"mode": name, "rows": len(prompts), "batch": 1, "tokens": tokens * len(prompts),
                     "seconds": seconds, "tok_per_s": tokens * len(prompts) / seconds})
    return rows


def is_transformers(model: object) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def markdown(rows: list[dict]) -> str:
    """One table; `vs_large_only` is each row's tok/s over the large-only row's of the same pair and batch."""
    lines = [("| pair | batch | mode | tok/s | vs large-only | large share | acceptance | accepted per pass | "
              "tokens per large pass | same as large-only |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def num(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else ""

    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('pair', '')} | {r.get('batch', '')} | error: {r['error'][:80]} | | | | | | | |")
            continue
        gaps = r.get("logit_gaps_at_differences")
        gaps = f" (logit gaps {min(gaps):.2f} to {max(gaps):.2f})" if gaps else ""
        lines.append(f"| {r.get('pair', '')} | {r['batch']} | {r['mode']} | {r['tok_per_s']:.2f} | "
                     f"{num(r, 'vs_large_only', '.2f')}{'x' if r.get('vs_large_only') else ''} | "
                     f"{num(r, 'large_share', '.1%')} | {num(r, 'acceptance_rate', '.1%')} | "
                     f"{num(r, 'accepted_per_pass', '.2f')} | {num(r, 'tokens_per_large_pass', '.2f')} | "
                     f"{r.get('rows_same_as_large_only', '')}{gaps} |")
    return "\n".join(lines)
