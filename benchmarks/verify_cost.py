"""What speculation and the hybrid would give at a pair's cost ratio: the step costs measured, acceptance given.

Acceptance cannot be measured on random weights, and the default pair (0.5B/1.5B) is too small for its steps to
be bandwidth-bound, so on it speculation meets launch costs the paper's pairs do not. This measures, on random
bf16 weights at two named shapes (default the paper's 1.5B -> 14B), the three costs a speculative round is made
of, through `NativeBatchRunner.feed_many` as the engine calls it (graphs replayed, host sync included):
T_small (one small decode step), T_large (one large decode step) and T_verify(w) (one large pass over w tokens
per row, every position's logits: `gamma` drafts plus the one before them). Then, with E tokens per round (the
accepted drafts plus the large model's own; E = (1 - a^(gamma+1)) / (1 - a) for a per-token acceptance a,
Leviathan et al. 2023, at most gamma + 1), greedy speculation and the hybrid give

    speculative tok/s = E / (gamma * T_small + T_verify(gamma + 1))
    hybrid at f       : a token costs (1 - f) * T_small + f * (gamma * T_small + T_verify(gamma + 1)) / E
    EAD at f          : a token costs (1 - f) * T_small + f * T_large  (catch-up left out: 99% of ideal measured)

at the E measured on the real default pair (4.01 of 5 at gamma 4 on GSM8K, BENCHMARKS.md) and a lower one. A
prediction from measured parts, not a run: it leaves out the hybrid's catch-ups and rows that end inside a draft.

    PYTHONPATH=. python benchmarks/verify_cost.py --pair qwen2.5-1.5b:qwen2.5-14b --batch 1,8
"""

from __future__ import annotations

import argparse
import time

import torch

from ead.bench import random_native
from ead.runner import NativeBatchRunner


def timed_ms(fn, repeats: int) -> float:
    """Median wall-clock ms of `fn()` (which syncs with the host itself, as the engine's rounds do)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def step_costs(shape: str, batch: int, widths: list[int], prompt: int, repeats: int,
               device: torch.device) -> dict[str, float]:
    """ms of one decode step and of a verification pass of each width, `batch` rows at `prompt` tokens."""
    model = random_native(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    vocab = model.args.vocab_size
    runner = NativeBatchRunner(model, vocab, max_seq_tokens=1024, cuda_graphs=True, max_batch=batch,
                               fused_kernels=True)
    slots = list(range(batch))
    runner.feed_many(slots, [list(range(100, 100 + prompt))] * batch)
    runner.capture_graphs(prompt + max(widths) + 1, verify=True)

    def decode() -> None:
        _, summary = runner.feed_many(slots, [[7]] * batch, with_summary=True)
        summary.tolist()  # the engine's one host sync per round
        for s in slots:
            runner.truncate(s, prompt)

    def verify(width: int):
        def run() -> None:
            logits = runner.feed_many(slots, [[7] * width] * batch, all_logits=True)
            [row.argmax(-1).tolist() for row in logits]  # greedy acceptance reads the targets
            for s in slots:
                runner.truncate(s, prompt)
        return run

    costs = {"decode": timed_ms(decode, repeats)}
    costs.update({f"verify{w}": timed_ms(verify(w), repeats) for w in widths})
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="qwen2.5-1.5b:qwen2.5-14b", help="small:large shapes (ead.bench.SHAPES)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--tokens-per-round", default="3,4.01",
                   help="E values to predict at (4.01: the real default pair, gamma 4, GSM8K)")
    p.add_argument("--shares", default="0.25,0.43", help="large shares f for the EAD and hybrid predictions")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--device", default="cuda", help="cpu only to try the script (float32, no graphs)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    small, large = args.pair.split(":")
    widths = sorted({2, args.gamma + 1, 8})
    device = torch.device(args.device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.pair}, {card}, gamma {args.gamma}, prompt {args.prompt_tokens} tokens, "
          f"median of {args.repeats}")
    for batch in [int(b) for b in args.batch.split(",")]:
        s = step_costs(small, batch, widths, args.prompt_tokens, args.repeats, device)
        lg = step_costs(large, batch, widths, args.prompt_tokens, args.repeats, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t_s, t_l, t_v = s["decode"], lg["decode"], lg[f"verify{args.gamma + 1}"]
        print(f"\nbatch {batch}: T_small {t_s:.2f} ms, T_large {t_l:.2f} ms (ratio {t_s / t_l:.2f}), "
              + ", ".join(f"T_verify({w}) {lg[f'verify{w}']:.2f} ms" for w in widths))
        print("\n| mode | tokens per round | predicted vs large-only |\n| --- | ---: | ---: |")
        round_ms = args.gamma * t_s + t_v
        for e in [float(x) for x in args.tokens_per_round.split(",")]:
            print(f"| speculative gamma={args.gamma} | {e:g} | {e / round_ms * t_l:.2f}x |")
            for f in [float(x) for x in args.shares.split(",")]:
                print(f"| hybrid f={f:g} | {e:g} | {t_l / ((1 - f) * t_s + f * round_ms / e):.2f}x |")
        for f in [float(x) for x in args.shares.split(",")]:
            print(f"| EAD f={f:g} | | {t_l / ((1 - f) * t_s + f * t_l):.2f}x |")


if __name__ == "__main__":
    main()
