"""The engine's host work per token: what a batched round costs beside the forward passes.

Tiny random qwen2 models (1 and 2 layers, width 32 and 64) with a byte-level BPE tokenizer trained on GSM8K
questions, as the tests build them, so the forward passes are nearly free and what remains is the engine's
Python: routers, stop checks (incremental decoding), traces. `--batch` prompts (GSM8K questions), `--tokens`
each, EAD at tau 0.5, one thread. Prints microseconds per generated token for the whole `generate_many` call,
`BatchEngine._advance` (per-token bookkeeping) and `StopChecker.update` (its share), from cProfile.

    python benchmarks/host_overhead.py --batch 64 --tokens 200
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import ead  # noqa: E402
from conftest import build_model, build_tokenizer, gsm8k_questions  # noqa: E402
from ead.config import EngineConfig, RouterConfig  # noqa: E402
from ead.engine import BatchEngine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--backend", default="native", choices=["native", "hf"])
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    root = Path(tempfile.mkdtemp(prefix="ead-host-"))
    tok = build_tokenizer(384, gsm8k_questions(400))
    for name, hidden, layers in (("small", 32, 1), ("large", 64, 2)):
        model = build_model("qwen2", len(tok), hidden, layers, seed=layers)
        model.config.max_position_embeddings = 4096
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    pair = ead.load_pair(str(root / "small"), str(root / "large"), device="cpu", dtype="float32")
    engine = BatchEngine(pair, RouterConfig(threshold_bits=0.5), EngineConfig(backend=args.backend),
                         max_batch=args.batch)
    prompts = [pair.encode(q) for q in gsm8k_questions(2 * args.batch)]
    params = ead.SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    engine.generate_many(prompts[:4], params)  # warm-up
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    results = engine.generate_many(prompts, params)
    profiler.disable()
    seconds = time.perf_counter() - t0
    n = sum(len(r.token_ids) for r in results)
    stats = pstats.Stats(profiler).stats
    cumulative = {f"{Path(file).name}:{func}": ct for (file, _, func), (_, _, _, ct, _) in stats.items()}
    us = lambda s: f"{s / n * 1e6:.1f}"  # noqa: E731
    print(f"{len(prompts)} prompts x {args.tokens} tokens at batch {args.batch}, backend {args.backend}: {n} tokens")
    print(f"whole call (profiled): {us(seconds)} us/token")
    print(f"BatchEngine._advance: {us(cumulative['engine.py:_advance'])} us/token, of which "
          f"StopChecker.update {us(cumulative['stopping.py:update'])}")


if __name__ == "__main__":
    main()
