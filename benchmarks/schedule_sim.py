"""How fast can batched EAD be, whatever the scheduler? A simulation of two-group scheduling policies.

Rows follow the same scripted roles as `ead bench` (the paper's rule on a synthetic entropy stream per row,
tau set for a large share f). A round steps one group and gives each of its rows one token; it costs the
measured step time of that model at that batch size (H100, 1.5B -> 14B shapes, `ead bench` of 2026-11-26), plus
a compute cost per catch-up token. No host work, no launch cost: an upper bound for each policy. Prints each
policy's throughput relative to large-only at the same batch size.

    python benchmarks/schedule_sim.py
"""

from __future__ import annotations

from ead.bench import roles_for_share
from ead.config import Role

S, L = Role.SMALL, Role.LARGE
STEP_MS = {4: (2.49, 12.1), 16: (2.74, 13.0), 64: (3.86, 16.4)}  # (small, large) per round, from ead bench
CATCHUP_MS_PER_TOKEN = {S: 0.003, L: 0.03}  # dense compute of one token, 1.5B and 14B


def simulate(batch: int, share: float, policy, tokens: int = 256) -> float:
    t_small, t_large = STEP_MS[batch]
    scripts = [roles_for_share(tokens, share, seed=1000 * batch + i) for i in range(batch)]
    pos, seen = [0] * batch, {S: [0] * batch, L: [0] * batch}
    state, elapsed = {"waited": {S: 0.0, L: 0.0}, "phase": None}, 0.0
    while any(p < tokens for p in pos):
        groups = {g: [i for i in range(batch) if pos[i] < tokens and scripts[i][pos[i]] is g] for g in (S, L)}
        g = policy(groups, state, t_small, t_large)
        cost = (t_small if g is S else t_large) + CATCHUP_MS_PER_TOKEN[g] * sum(
            pos[i] - seen[g][i] for i in groups[g])
        for i in groups[g]:
            seen[g][i] = pos[i] + 1
            pos[i] += 1
        for o in (S, L):
            state["waited"][o] = 0.0 if o is g or not groups[o] else state["waited"][o] + cost
        elapsed += cost
    return batch * tokens / elapsed / (batch / t_large)


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


POLICIES = {"rate, wait 8": rate(8), "rate, no bound": rate(1e9), "fill 0.9, no bound": fill(0.9, 1e9),
            "fill 0.75, no bound": fill(0.75, 1e9), "fill 0.75, wait 16 (ead)": fill(0.75, 16)}

if __name__ == "__main__":
    print("| batch | f | " + " | ".join(POLICIES) + " |")
    print("| ---: | ---: |" + " ---: |" * len(POLICIES))
    for batch in STEP_MS:
        for share in (0.1, 0.25, 0.43):
            cells = [f"{simulate(batch, share, p):.2f}x" for p in POLICIES.values()]
            print(f"| {batch} | {share} | " + " | ".join(cells) + " |")
