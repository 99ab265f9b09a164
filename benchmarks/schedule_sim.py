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

    python benchmarks/schedule_sim.py [--roofline]
"""

from __future__ import annotations

import argparse

from ead.bench import roles_for_share
from ead.config import Role

S, L = Role.SMALL, Role.LARGE
STEP_MS = {4: (2.49, 12.1), 16: (2.74, 13.0), 64: (3.86, 16.4)}  # (small, large) per round, from ead bench
CATCHUP_MS_PER_TOKEN = {S: 0.003, L: 0.03}  # dense compute of one token, 1.5B and 14B


def simulate(batch: int, share: float, policy, tokens: int = 256, roofline: bool = False) -> tuple[float, float]:
    """(throughput relative to large-only, realised large share). The roles are scripted per token index, so a
    ride-along token moves a row's script on as any token does (ead's ScriptedRouter)."""
    t_small, t_large = STEP_MS[batch]
    scripts = [roles_for_share(tokens, share, seed=1000 * batch + i) for i in range(batch)]
    pos, seen = [0] * batch, {S: [0] * batch, L: [0] * batch}
    state = {"waited": {S: 0.0, L: 0.0}, "phase": None, "step_ms": {S: t_small, L: t_large}}
    elapsed, large_tokens = 0.0, 0
    while any(p < tokens for p in pos):
        groups = {g: [i for i in range(batch) if pos[i] < tokens and scripts[i][pos[i]] is g] for g in (S, L)}
        g = policy(groups, state, t_small, t_large)
        rows = groups[S] + groups[L] if g is L and getattr(policy, "ride_along", False) else groups[g]
        behind = sum(pos[i] - seen[g][i] for i in rows)  # catch-up tokens, besides one new token per row
        step = t_small if g is S else t_large
        cost = max(step, CATCHUP_MS_PER_TOKEN[g] * (behind + len(rows))) if roofline else \
            step + CATCHUP_MS_PER_TOKEN[g] * behind
        for i in rows:
            seen[g][i] = pos[i] + 1
            pos[i] += 1
        large_tokens += len(rows) if g is L else 0
        for o in (S, L):
            state["waited"][o] = 0.0 if o is g or not [i for i in groups[o] if i not in rows] \
                else state["waited"][o] + cost
        state["step_ms"][g] = 0.9 * state["step_ms"][g] + 0.1 * cost  # as BatchEngine measures, catch-up included
        elapsed += cost
    return batch * tokens / elapsed / (batch / t_large), large_tokens / (batch * tokens)


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


def phased(high, low, wait):
    """Not in ead: the throughput schedule with a large phase. Once the large group holds `high` of the rows (or
    has waited `wait` large steps) large rounds, which all rows ride, go on until it holds less than `low`; between
    phases, the throughput rule. Each round is still at least as fast per token as large-only, and rows leave
    their large segments together, so that the small rounds after them are full."""
    def policy(groups, state, t_small, t_large):
        t_small, t_large = state["step_ms"][S], state["step_ms"][L]
        n_all = len(groups[S]) + len(groups[L])
        if groups[L] and (state["waited"][L] > wait * t_large or len(groups[L]) >= high * n_all):
            state["phase"] = L
        elif len(groups[L]) < low * n_all:
            state["phase"] = None
        if state["phase"] is L:
            return L
        return S if len(groups[S]) / t_small > n_all / t_large else L
    policy.ride_along = True
    return policy


POLICIES = {"rate, wait 8": rate(8), "rate, no bound": rate(1e9), "fill 0.9, no bound": fill(0.9, 1e9),
            "fill 0.75, no bound": fill(0.75, 1e9), "fill 0.75, wait 16 (ead exact)": fill(0.75, 16),
            "throughput, catch-up not charged, wait 16": throughput(16, charge_catch_up=False),
            "throughput, wait 16 (ead)": throughput(16), "throughput, phase 0.75-0.3, wait 16": phased(0.75, 0.3, 16)}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roofline", action="store_true", help="a round costs max(step, compute), not step + catch-up")
    args = p.parse_args()
    print("| batch | f | " + " | ".join(POLICIES) + " |")
    print("| ---: | ---: |" + " ---: |" * len(POLICIES))
    for batch in STEP_MS:
        for share in (0.1, 0.25, 0.43):
            cells = []
            for policy in POLICIES.values():
                speed, realised = simulate(batch, share, policy, roofline=args.roofline)
                cells.append(f"{speed:.2f}x" + (f" (f {realised:.2f})" if getattr(policy, "ride_along", False) else ""))
            print(f"| {batch} | {share} | " + " | ".join(cells) + " |")
