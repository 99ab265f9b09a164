"""Speculative decoding with the pair: the small model drafts a few tokens, the large model checks them all in
one forward pass, and the text gets the large model's tokens, exactly (greedy) or in distribution (sampling).

It owns drafting, verification and the acceptance rule, and rolling both caches back past rejected drafts. It
leaves sequences' bookkeeping (trace, stopping, routing) to `ead.engine`, which calls `Speculator.run` for
the rows whose tokens must be the large model's: every row in mode "speculative", the rows the EAD rule gives
to the large model in mode "hybrid". The engine adds the tokens of each `Verdict` one by one, stops early
when the text ends or (hybrid) the router hands back to the small model, then calls `rollback`.

Acceptance (Leviathan et al. 2023, Chen et al. 2023). Greedy: draft tokens are kept while they equal the large
model's argmax, and the first mismatch is replaced by it. Sampling: draft token x, drawn from the small model's
distribution q, is kept with probability min(1, p(x) / q(x)), p the large model's; the first rejected one is
replaced by a draw from norm(max(0, p - q)); when all are kept the large model adds one more token from its own
p. p and q are both shaped by the request's temperature, top-k and top-p (`sampling_probs`) before the
ratio, so the output follows the large model's sampling distribution exactly.

On the native backend with CUDA graphs, a verification pass of one token and a draft of up to 15 per row
replays a captured graph (`NativeBatchRunner.verify_graphs`); a wider one (the first pass, which reads the
prompt, or a long hybrid catch-up) runs eagerly. The acceptance of sampled rows syncs with the host once per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ead.config import SpeculativeConfig
from ead.sampling import sampling_probs

if TYPE_CHECKING:
    from ead.engine import Sequence


def accept_greedy(draft: list[int], targets: list[int]) -> tuple[int, list[int]]:
    """Greedy verification: `targets` (len(draft) + 1) are the large model's argmax after each draft prefix.
    Returns (accepted draft tokens, the tokens the text gets: those plus the large model's next one)."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return n, draft[:n] + [targets[n]]


def accept_sampled(draft: list[int], q: Tensor | None, p: Tensor,
                   generator: torch.Generator | None) -> tuple[int, list[int]]:
    """Speculative sampling: `q` (d, V) the small model's sampling distributions the d draft tokens were drawn
    from (None when d = 0), `p` (d + 1, V) the large model's after each draft prefix. Returns (accepted, tokens)
    as accept_greedy, the tokens distributed as if the large model had sampled them one by one."""
    d = len(draft)
    if d:
        x = torch.tensor(draft, device=p.device)
        rows = torch.arange(d, device=p.device)
        ratio = p[rows, x] / q[rows, x]  # q(x) > 0: x was drawn from q
        u = torch.rand(d, generator=generator, device=p.device)
        n = int((u < ratio).int().cumprod(0).sum())  # accepted with probability min(1, ratio), up to a rejection
    else:
        n = 0
    dist = p[n]
    if n < d:  # the residual norm(max(0, p - q)); zero only where p == q, which never rejects
        residual = (p[n] - q[n]).clamp(min=0)
        dist = residual if residual.sum() > 0 else dist
    token = int(torch.multinomial(dist, 1, generator=generator))
    return n, draft[:n] + [token]


@dataclass
class Verdict:
    """One row's speculation round. The large model read `fed` (tokens of the text it had not seen) and then
    `draft`; the text gets `tokens` (the first `accepted` draft tokens, then the large model's own), and
    `signals[j]` (SIGNAL_NAMES order) describes the large model's distribution `tokens[j]` came from."""

    start: int  # tokens of the sequence before this round
    fed: list[int]
    draft: list[int]
    accepted: int
    tokens: list[int]
    signals: list[list[float]]


class Speculator:
    """Drafting with the small runner and verification with the large one, over many rows at once; the
    runners are the engine's (see `ead.runner.HFBatchRunner` for `feed_many(all_logits=...)` and `truncate`)."""

    def __init__(self, small, large, cfg: SpeculativeConfig, max_seq_tokens: int,
                 token_signals: Callable[[Tensor], Tensor]) -> None:
        self.small, self.large, self.cfg = small, large, cfg
        self.max_seq_tokens, self.token_signals = max_seq_tokens, token_signals

    def run(self, rows: list[Sequence]) -> list[Verdict]:
        """Draft for every row, verify all drafts in one large-model pass, and accept per row."""
        drafts, qs = self._draft(rows)
        slots = [seq.slot for seq in rows]
        starts = [len(seq.ids) for seq in rows]
        fed = [seq.ids[self.large.seen[seq.slot]:] for seq in rows]
        outs = self.large.feed_many(slots, [f + d for f, d in zip(fed, drafts)], all_logits=True)
        ps = [out[-(len(d) + 1):] for out, d in zip(outs, drafts)]  # (d + 1, V): after each draft prefix
        flat = torch.cat(ps)
        # One host sync for every row's signals and argmax; sampled rows draw on the device first.
        values = torch.cat([self.token_signals(flat), flat.argmax(dim=-1, keepdim=True).to(flat.dtype)], dim=1).tolist()
        verdicts, at = [], 0
        for seq, f, d, q, p, start in zip(rows, fed, drafts, qs, ps, starts):
            rows_values, at = values[at: at + len(d) + 1], at + len(d) + 1
            if seq.sampling.greedy:
                n, tokens = accept_greedy(d, [int(v[-1]) for v in rows_values])
            else:
                n, tokens = accept_sampled(d, torch.stack(q) if q else None, sampling_probs(p, seq.sampling),
                                           seq.generator)
            verdicts.append(Verdict(start, f, d, n, tokens, [v[:-1] for v in rows_values[: len(tokens)]]))
        return verdicts

    def _draft(self, rows: list[Sequence]) -> tuple[list[list[int]], list[list[Tensor]]]:
        """Up to `max_draft_tokens` small-model tokens per row, one batched small step each, fewer near a row's
        max_new_tokens or the end of the context (the large model adds one token more), and with
        `draft_confidence` none after a token whose top-1 probability was below it. Returns the draft tokens
        and, for sampled rows, the (V,) distributions they were drawn from."""
        budgets = [min(self.cfg.max_draft_tokens, seq.sampling.max_new_tokens - len(seq.generated) - 1,
                       self.max_seq_tokens - len(seq.ids) - 1) for seq in rows]
        drafts: list[list[int]] = [[] for _ in rows]
        qs: list[list[Tensor]] = [[] for _ in rows]
        busy = [i for i, b in enumerate(budgets) if b > 0]
        while busy:
            slots = [rows[i].slot for i in busy]
            feeds = []
            for i in busy:
                seq, seen = rows[i], self.small.seen[rows[i].slot]
                seq.trace.prefill_tokens["small"] += max(0, len(seq.prompt_ids) - seen)
                feeds.append((seq.ids + drafts[i])[seen:])
            logits = self.small.feed_many(slots, feeds)  # (n, V) float32
            tokens = logits.argmax(dim=-1)
            for j, i in enumerate(busy):
                if not rows[i].sampling.greedy:
                    q = sampling_probs(logits[j], rows[i].sampling)
                    tokens[j] = torch.multinomial(q, 1, generator=rows[i].generator)[0]
                    qs[i].append(q)
            top1 = logits.softmax(dim=-1).amax(dim=-1)  # raw, temperature 1
            values = torch.stack([tokens.to(top1.dtype), top1], dim=1).tolist()  # one host sync per draft step
            confident = self.cfg.draft_confidence
            for (token, p1), i in zip(values, busy):
                drafts[i].append(int(token))
                if confident is not None and p1 < confident:
                    budgets[i] = len(drafts[i])
            busy = [i for i in busy if len(drafts[i]) < budgets[i]]
        return drafts, qs

    def rollback(self, slot: int, verdict: Verdict, kept: int) -> None:
        """After the engine kept the first `kept` of `verdict.tokens`, cut each model's cache back to the text it
        agrees with, and at least one token short of the text, since the logits after its last token are needed."""
        text = verdict.tokens[:kept]
        for runner in (self.small, self.large):
            seen = runner.seen[slot]
            fed_draft = verdict.draft[: max(0, seen - verdict.start)]
            agree = next((k for k, (a, b) in enumerate(zip(fed_draft, text)) if a != b), min(len(fed_draft), kept))
            keep = min(verdict.start + agree, verdict.start + kept - 1)
            if seen > keep:
                runner.truncate(slot, keep)
