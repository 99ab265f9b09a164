"""How fast can batched EAD be, whatever the scheduler? A simulation of two-group scheduling policies.

Rows follow the same scripted roles as `ead bench` (the paper's rule on a synthetic entropy stream per row,
tau set for a large share f). A round steps one group and gives each of its rows one token; it costs the
measured step time of that model at that batch size (H100, 1.5B -> 14B shapes, `ead bench` of 2026-11-26), plus
a compute cost per catch-up token. No host work, no launch cost: an upper bound for each policy. Prints each
policy's throughput relative to large-only at the same batch size.

The exact policies keep every row's text what it is alone. The throughput schedule (BatchEngine's
schedule="throughput") lets a large round carry the rows in small mode too ("ride-along"): its columns also give
the realised large share, which exceeds f, since the ride-along tokens are the large model's.

Catch-up is added to a round's cost by default, as if it ran after the weight read; `--roofline` charges a round
max(step, compute of all its tokens) instead, as a memory-bound step that hides the compute of a few hundred
tokens under its weight read would.

`--passes` charges each round the passes NativeBatchRunner would run for it, costed as session 5's per-pass
profile measured them on an H100 (`benchmarks/profile_batch.py`, BENCHMARKS.md): a decode pass the model's step;
a catch-up pass, padded as the runner pads it (to power-of-two rows and widths in a graph, to its longest row
when eager, one-token rows merged in when they add at most 256 padded tokens), max(step + a pass overhead,
its padded tokens x the measured cost of one); a 128-token prompt per row, read by each model at its first pass;
0.3 ms of host work a round. `--split` also splits eager catch-ups by length as the runner does since 838b01c.
Step costs: that session's H100 runs at 128 new tokens a row, as `ead bench` ran them.

`--packed` costs every catch-up as one pass of the rows' tokens end to end, without padding (a packed, varlen
catch-up, which the runner does not have): what such a kernel would buy.

    python benchmarks/schedule_sim.py [--roofline | --passes [--split | --packed]]
"""

from __future__ import annotations

import argparse

from ead.bench import roles_for_share
from ead.config import Role

S, L = Role.SMALL, Role.LARGE
STEP_MS = {4: (2.49, 12.1), 16: (2.74, 13.0), 64: (3.86, 16.4)}  # (small, large) per round, from ead bench
CATCHUP_MS_PER_TOKEN = {S: 0.003, L: 0.03}  # dense compute of one token, 1.5B and 14B
# --passes: session 5's H100 profile (1.5B -> 14B, bf16). Step per batch size; a catch-up pass costs
# max(step + PASS_OVERHEAD_MS, PADDED_MS x padded tokens) (e.g. 14B: 16 x 32 -> 28.7 ms, 48 x 200 eager -> 519 ms).
PASS_STEP_MS = {16: (2.9, 12.6), 64: (3.4, 13.7)}
PASS_OVERHEAD_MS = {S: 0.8, L: 4.5}
PADDED_MS = {S: 0.008, L: 0.054}
HOST_MS, PROMPT_TOKENS, MERGE_TOKENS, GRAPH_TOKENS, GRAPH_WIDTH = 0.3, 128, 256, 1024, 256


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def split(widths: list[int]) -> list[list[int]]:
    """NativeBatchRunner._split: rows grouped by length to minimise the sum of max(MERGE_TOKENS, rows x longest)."""
    from types import SimpleNamespace

    from ead.runner import NativeBatchRunner

    return NativeBatchRunner._split(SimpleNamespace(MERGE_TOKENS=MERGE_TOKENS), widths)


def passes_cost(g: Role, widths: list[int], step: float, by_length: bool, packed: bool = False) -> float:
    """Milliseconds of the passes the runner runs for rows bringing `widths` tokens each (see the docstring).
    `packed`: a catch-up as one pass of every row's tokens end to end, no padding, the one-token rows in it too
    (not in the runner: what such a kernel would buy), costed max(step + pass overhead, cost of a token x tokens)."""
    def pass_ms(rows: int, width: int, graphed: bool) -> float:
        padded = pow2(rows) * max(2, pow2(width)) if graphed else rows * width
        return max(step + PASS_OVERHEAD_MS[g], PADDED_MS[g] * padded)

    many, one = [w for w in widths if w > 1], [w for w in widths if w == 1]
    if not many:
        return step
    if packed:
        return max(step + PASS_OVERHEAD_MS[g], PADDED_MS[g] * sum(widths))
    width = max(many)
    if one and (pow2(len(widths)) - pow2(len(many))) * max(2, pow2(width)) <= MERGE_TOKENS:
        many, one = widths, []
    graphed = pow2(len(many)) * max(2, pow2(width)) <= GRAPH_TOKENS and pow2(width) <= GRAPH_WIDTH
    if graphed:
        ms = pass_ms(len(many), width, True)
    elif by_length:
        ms = sum(pass_ms(len(grp), max(many[i] for i in grp), False) for grp in split(many))
    else:
        ms = pass_ms(len(many), width, False)
    return ms + (step if one else 0.0)


def simulate(batch: int, share: float, policy, tokens: int = 256, roofline: bool = False,
             passes: bool = False, by_length: bool = False, packed: bool = False) -> tuple[float, float]:
    """(throughput relative to large-only, realised large share). The roles are scripted per token index, so a
    ride-along token moves a row's script on as any token does (ead's ScriptedRouter). With `passes`, large-only
    is costed the same way (its prompt pass, decode steps and host work)."""
    t_small, t_large = (PASS_STEP_MS if passes else STEP_MS)[batch]
    scripts = [roles_for_share(tokens, share, seed=1000 * batch + i) for i in range(batch)]
    prompt = PROMPT_TOKENS if passes else 0
    pos, seen = [0] * batch, {S: [-prompt] * batch, L: [-prompt] * batch}
    state = {"waited": {S: 0.0, L: 0.0}, "phase": None, "step_ms": {S: t_small, L: t_large}}
    elapsed, large_tokens = 0.0, 0
    while any(p < tokens for p in pos):
        groups = {g: [i for i in range(batch) if pos[i] < tokens and scripts[i][pos[i]] is g] for g in (S, L)}
        g = policy(groups, state, t_small, t_large)
        rows = groups[S] + groups[L] if g is L and getattr(policy, "ride_along", False) else groups[g]
        behind = sum(pos[i] - seen[g][i] for i in rows)  # catch-up tokens, besides one new token per row
        step = t_small if g is S else t_large
        if passes:
            cost = HOST_MS + passes_cost(g, [pos[i] - seen[g][i] + 1 for i in rows], step, by_length, packed)
        elif roofline:
            cost = max(step, CATCHUP_MS_PER_TOKEN[g] * (behind + len(rows)))
        else:
            cost = step + CATCHUP_MS_PER_TOKEN[g] * behind
        for i in rows:
            seen[g][i] = pos[i] + 1
            pos[i] += 1
        large_tokens += len(rows) if g is L else 0
        for o in (S, L):
            state["waited"][o] = 0.0 if o is g or not [i for i in groups[o] if i not in rows] \
                else state["waited"][o] + cost
        state["step_ms"][g] = 0.9 * state["step_ms"][g] + 0.1 * cost  # as BatchEngine measures, catch-up included
        elapsed += cost
    large_only = tokens * t_large if not passes else \
        passes_cost(L, [prompt + 1] * batch, t_large, by_length) + (tokens - 1) * t_large + tokens * HOST_MS
    return batch * tokens / elapsed / (batch * tokens / large_only), large_tokens / (batch * tokens)


def starved(groups, state, t_large, wait):
    return [g for g in (S, L) if groups[g] and state["waited"][g] > wait * t_large]


def rate(wait):
    """The group with the most rows per millisecond of its step."""
    def policy(groups, state, t_small, t_large):
        if not groups[S] or not groups[L]:
            return S if groups[S] else L
        if s := starved(groups, state, t_large, wait):
            return s[0]
        return S if len(groups[S]) / t_small > len(groups[L]) / t_large else L
    return policy


def fill(theta, wait):
    """The large group once it holds `theta` of the running rows (ead's BatchEngine: 0.75, 16)."""
    def policy(groups, state, t_small, t_large):
        if not groups[S] or not groups[L]:
            return S if groups[S] else L
        if s := starved(groups, state, t_large, wait):
            return s[0]
        return L if len(groups[L]) >= theta * (len(groups[L]) + len(groups[S])) else S
    return policy


def throughput(wait, charge_catch_up=True):
    """ead's schedule="throughput": small when n_small / (T_small + c * n_small) > n_all / T_large, T_small the
    measured small step (moving average), T_large the large step without catch-up and c the large model's cost
    of catching a token up later (ead fits both to its large rounds, `BatchEngine.large_costs`; here they are the
    model's own), else a large round that all rows ride; the large group goes next once it has waited `wait` large
    steps. `charge_catch_up=False`: the first version, c = 0 and T_large the moving average, catch-up included."""
    def policy(groups, state, t_small, t_large):
        t_small = state["step_ms"][S]
        c = CATCHUP_MS_PER_TOKEN[L] if charge_catch_up else 0.0
        if not charge_catch_up:
            t_large = state["step_ms"][L]
        if groups[L] and state["waited"][L] > wait * t_large:
            return L
        n_all = len(groups[S]) + len(groups[L])
        return S if len(groups[S]) / (t_small + c * len(groups[S])) > n_all / t_large else L
    policy.ride_along = True
    return policy


def phased(high, low, wait, charge_catch_up=False):
    """The throughput schedule with phases of large rounds (ead's `large_phase`, which charges catch-up between
    phases: `charge_catch_up`). Once the large group holds `high` of the rows (or has waited `wait` large steps)
    large rounds, which all rows ride, go on until it holds less than `low`; between phases, the throughput rule.
    Rows leave their large segments together, so that the small rounds after them are full."""
    def policy(groups, state, t_small, t_large):
        t_small = state["step_ms"][S]
        t_large = t_large if charge_catch_up else state["step_ms"][L]
        c = CATCHUP_MS_PER_TOKEN[L] if charge_catch_up else 0.0
        n_all = len(groups[S]) + len(groups[L])
        if groups[L] and (state["waited"][L] > wait * t_large or len(groups[L]) >= high * n_all):
            state["phase"] = L
        elif len(groups[L]) < low * n_all:
            state["phase"] = None
        if state["phase"] is L:
            return L
        return S if len(groups[S]) / (t_small + c * len(groups[S])) > n_all / t_large else L
    policy.ride_along = True
    return policy


POLICIES = {"rate, wait 8": rate(8), "rate, no bound": rate(1e9), "fill 0.9, no bound": fill(0.9, 1e9),
            "fill 0.75, no bound": fill(0.75, 1e9), "fill 0.75, wait 16 (ead exact)": fill(0.75, 16),
            "throughput, catch-up not charged, wait 16": throughput(16, charge_catch_up=False),
            "throughput, wait 16 (ead)": throughput(16), "throughput, phase 0.75-0.3, wait 16": phased(0.75, 0.3, 16),
            "throughput, phase 0.5-0.2, wait 16 (ead large_phase)": phased(0.5, 0.2, 16, charge_catch_up=True)}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roofline", action="store_true", help="a round costs max(step, compute), not step + catch-up")
    p.add_argument("--passes", action="store_true", help="each round costs the runner's passes, as measured on an "
                   "H100 in session 5; rows of a 128-token prompt and 128 new tokens")
    p.add_argument("--split", action="store_true", help="with --passes: eager catch-ups split by length")
    p.add_argument("--packed", action="store_true", help="with --passes: catch-ups packed, not padded (no such "
                   "kernel in the runner yet)")
    p.add_argument("--step-ms", metavar="B:SMALL/LARGE,...", help="with --passes: step costs per batch size in ms "
                   "instead of session 5's, e.g. session 7's graph replays 16:2.34/12.1,64:2.75/13.0")
    p.add_argument("--tokens", type=int, help="new tokens a row (default 128 with --passes, else 256)")
    args = p.parse_args()
    if args.step_ms:
        PASS_STEP_MS = {int(b): tuple(float(x) for x in ms.split("/"))
                        for b, ms in (item.split(":") for item in args.step_ms.split(","))}
    print("| batch | f | " + " | ".join(POLICIES) + " |")
    print("| ---: | ---: |" + " ---: |" * len(POLICIES))
    for batch in (PASS_STEP_MS if args.passes else STEP_MS):
        for share in (0.1, 0.25, 0.43):
            cells = []
            for policy in POLICIES.values():
                speed, realised = simulate(batch, share, policy, tokens=args.tokens or (128 if args.passes else 256),
                                           roofline=args.roofline, passes=args.passes, by_length=args.split,
                                           packed=args.packed)
                cells.append(f"{speed:.2f}x" + (f" (f {realised:.2f})" if getattr(policy, "ride_along", False) else ""))
            print(f"| {batch} | {share} | " + " | ".join(cells) + " |")
