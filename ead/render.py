"""Showing a generation to a person: text coloured by the model that wrote it (terminal and HTML), the summary
table, and the entropy-over-time strip. Reads GenerateResult and StepRecords; computes no statistics itself.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable

from ead.config import Role
from ead.metrics import GenerateResult

ANSI = {Role.SMALL: "\033[36m", Role.LARGE: "\033[1;35m"}  # small cyan, large bold magenta
RESET = "\033[0m"
PLAIN_MARKS = {Role.SMALL: ("", ""), Role.LARGE: ("\u27e6", "\u27e7")}  # without colour: ⟦large⟧


def visible_pieces(result: GenerateResult, decode: Callable[[list[int]], str], context_tokens: int = 8) -> list[str]:
    """The text each generated token adds, cut where the result's text was cut (stop strings, special tokens).

    Each piece is the difference of two short decodes, so the cost stays linear in the length; a character
    split across tokens goes to the token that completes it.
    """
    ids, pieces, remaining = result.token_ids, [], len(result.text)
    for i in range(len(ids)):
        ctx = ids[max(0, i - context_tokens): i]
        before, after = decode(ctx).rstrip("\ufffd"), decode(ctx + [ids[i]]).rstrip("\ufffd")
        piece = after[len(os.path.commonprefix([before, after])):][:remaining]
        remaining -= len(piece)
        pieces.append(piece)
    return pieces


def paint(text: str, role: Role, color: bool) -> str:
    if not text:
        return ""
    if color:
        return f"{ANSI[role]}{text}{RESET}"
    open_, close = PLAIN_MARKS[role]
    return f"{open_}{text}{close}"


def summary_table(result: GenerateResult) -> str:
    s = result.stats
    n = s.tokens_small + s.tokens_large
    to_large = sum(1 for e in result.trace.switches if e.to is Role.LARGE)
    rows = [
        ("", "small", "large", "total"),
        ("generated tokens", f"{s.tokens_small}", f"{s.tokens_large}", f"{n}"),
        ("share of tokens", f"{1 - s.large_share:.1%}" if n else "-", f"{s.large_share:.1%}" if n else "-", ""),
        ("prompt tokens read", f"{s.prefill_tokens_small}", f"{s.prefill_tokens_large}", ""),
        ("parameters", _human(s.params_small), _human(s.params_large), ""),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(width[0]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r)) for r in rows]
    lines += [
        f"switches: {s.switches} ({to_large} to large, {s.switches - to_large} to small); "
        f"catch-up: {s.catchup_tokens} tokens read by the model taking over",
        f"cost (paper, parameter-weighted): {s.cost_ratio:.3f} of the large model alone "
        f"({1 - s.cost_ratio:.1%} saved)",
        f"wall clock: {s.seconds:.2f} s, {s.tokens_per_s:.1f} tokens/s; finish: {result.finish_reason}",
    ]
    return "\n".join(lines)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)


def trace_html(result: GenerateResult, decode: Callable[[list[int]], str], threshold_bits: float,
               title: str = "ead trace") -> str:
    """A self-contained page: tokens coloured by model with entropy on hover, an entropy strip, the summary."""
    spans = []
    for step, piece in zip(result.trace.steps, visible_pieces(result, decode)):
        tip = (f"token {step.index} by {step.role.value}: entropy {step.entropy_bits:.3f} bits, "
               f"rolling mean {step.mean_bits:.3f} bits, read {step.fed_tokens} token(s), {step.step_ms:.1f} ms")
        switch = " switch" if any(e.index == step.index for e in result.trace.switches) else ""
        spans.append(f'<span class="{step.role.value}{switch}" title="{html.escape(tip)}">'
                     f"{html.escape(piece) or '&#8203;'}</span>")
    return PAGE.format(title=html.escape(title), strip=entropy_strip(result, threshold_bits),
                       text="".join(spans), summary=html.escape(summary_table(result)))


def entropy_strip(result: GenerateResult, threshold_bits: float, width: int = 1000, height: int = 140) -> str:
    """Inline SVG: per-token entropy (dots), its rolling mean (line), tau (dashed), and who wrote each token."""
    steps = result.trace.steps
    if not steps:
        return ""
    top = max(max(s.entropy_bits for s in steps), threshold_bits if threshold_bits < 1e9 else 0, 1.0)
    dx = width / len(steps)

    def y(bits: float) -> float:
        return height - 4 - (height - 8) * min(bits, top) / top

    bands = "".join(f'<rect x="{i * dx:.2f}" y="0" width="{dx + 0.05:.2f}" height="{height}" class="b{s.role.value}"/>'
                    for i, s in enumerate(steps))
    dots = "".join(f'<circle cx="{(i + 0.5) * dx:.2f}" cy="{y(s.entropy_bits):.2f}" r="1.6"><title>token {i}: '
                   f"{s.entropy_bits:.3f} bits</title></circle>" for i, s in enumerate(steps))
    mean = " ".join(f"{(i + 0.5) * dx:.2f},{y(s.mean_bits):.2f}" for i, s in enumerate(steps))
    tau = (f'<line x1="0" x2="{width}" y1="{y(threshold_bits):.2f}" y2="{y(threshold_bits):.2f}" class="tau"/>'
           if 0 <= threshold_bits <= top else "")
    return (f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" '
            f'aria-label="entropy per token">{bands}{tau}<polyline points="{mean}" class="mean"/>{dots}</svg>'
            f'<div class="axis">0 &#8230; {top:.2f} bits; dashed: tau = {threshold_bits:g} bits; line: rolling '
            f"mean; dots: entropy of each token; background: the model that wrote it</div>")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
.text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; border: 1px solid #ddd; padding: 1rem; }}
.small {{ background: #e3f2fd; }} .large {{ background: #f8d7f0; font-weight: 600; }}
.switch {{ box-shadow: inset 2px 0 0 #555; }}
span:hover {{ outline: 1px solid #333; }}
svg {{ width: 100%; height: 140px; border: 1px solid #ddd; }}
.bsmall {{ fill: #e3f2fd; }} .blarge {{ fill: #f8d7f0; }}
circle {{ fill: #333; }} .mean {{ fill: none; stroke: #c2185b; stroke-width: 1.5; }}
.tau {{ stroke: #000; stroke-dasharray: 6 4; }}
.axis, .legend {{ color: #555; font-size: 13px; }}
pre {{ background: #f6f6f6; padding: 1rem; }}
</style></head><body>
<h1>{title}</h1>
<p class="legend"><span class="small">small model</span> <span class="large">large model</span>
&mdash; hover a token for its entropy; a dark left edge marks a switch.</p>
{strip}
<div class="text">{text}</div>
<pre>{summary}</pre>
</body></html>
"""
