"""Which tau? Large-model share, switches and cost over a sweep of thresholds on GSM8K train questions.

One JSON object per (tau, question) on stdout, then one summary object per tau. GSM8K train is the
calibration split (shared/data/README.md): thresholds are chosen on it, accuracy is never reported from it.

    python benchmarks/choose_tau.py --taus 0.35 0.5 0.75 1.0 --questions 6 > runs/choose_tau.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import ead

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--taus", type=float, nargs="+", default=[0.35, 0.5, 0.75, 1.0])
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=320)
    p.add_argument("--small"), p.add_argument("--large")
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args()

    pair = ead.load_pair(args.small, args.large)
    rows = [json.loads(line) for line, _ in zip(open(args.data), range(args.questions))]
    sampling = ead.SamplingParams(max_new_tokens=args.max_new_tokens)
    small_entropy: list[float] = []
    for tau in [float("inf")] + args.taus:
        engine = ead.Engine(pair, ead.RouterConfig(threshold_bits=tau))
        per_q = []
        for i, row in enumerate(rows):
            ids = pair.encode([{"role": "user", "content": row["question"] + INSTRUCTION}])
            t0 = time.perf_counter()
            res = engine.generate(ids, sampling)
            gold = row["answer"].split("####")[-1].strip().replace(",", "")
            boxed = re.findall(r"\\boxed\{([^{}]*)\}", res.text)
            s = res.stats
            out = {"tau_bits": tau, "question": i, "tokens": s.tokens_small + s.tokens_large,
                   "large_share": s.large_share, "switches": s.switches, "catchup_tokens": s.catchup_tokens,
                   "cost_ratio": s.cost_ratio, "seconds": time.perf_counter() - t0,
                   "boxed_equals_gold": bool(boxed) and boxed[-1].replace(",", "").strip() == gold}
            print(json.dumps(out), flush=True)
            per_q.append(out)
            if tau == float("inf"):
                small_entropy += [st.entropy_bits for st in res.trace.steps]
        tokens = sum(r["tokens"] for r in per_q)
        large = sum(r["large_share"] * r["tokens"] for r in per_q)
        summary = {"summary": True, "tau_bits": tau, "large_share": large / tokens,
                   "mean_switches": statistics.mean(r["switches"] for r in per_q),
                   "exact_boxed": sum(r["boxed_equals_gold"] for r in per_q), "questions": len(per_q)}
        if tau == float("inf"):
            q = statistics.quantiles(small_entropy, n=10)
            summary |= {"small_entropy_median_bits": statistics.median(small_entropy),
                        "small_entropy_p90_bits": q[-1]}
        print(json.dumps(summary), flush=True)
        print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
