"""Final answers: extraction from a model's output and a gold solution, and mathematical equivalence.

Extraction is ours (the last `\\boxed{...}` with balanced braces; for GSM8K the gold after '####' and, when
the model boxed nothing, its last number). Equivalence is the `math-verify` package's (fractions vs decimals,
tuples, intervals, sets, units, percentages), so every number a run reports names that grader and version.
"""

from __future__ import annotations

import re
import threading
from importlib.metadata import version

BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def grader_info() -> dict:
    """What a run records about how it was graded."""
    return {"name": "math-verify", "version": version("math-verify"),
            "extraction": "last balanced \\boxed{}; gsm8k and JSONL files: else the last number of the output"}


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces balance, escaped `\\{`/`\\}` not
    counting; `\\boxed 5` gives "5". None when there is none (a box cut off by max_new_tokens does not count)."""
    for m in reversed(list(BOXED.finditer(text))):
        content = _braced(text, m.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def _braced(text: str, start: int) -> str | None:
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # \boxed 5: up to the next space, $ or end of line
        m = re.match(r"[^\s$]+", text[i:]) if i > start else None
        return m.group(0) if m else None
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # an escaped character, \{ or \} included, never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def gsm8k_gold(solution: str) -> str | None:
    """The number after the last '####' of a GSM8K solution, without thousands separators or a '$'."""
    if "####" not in solution:
        return None
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "").lstrip("$").strip()
    return gold or None


def last_number(text: str) -> str | None:
    """The last number written in `text` ("1,000" -> "1000", "-3.5" -> "-3.5"); None if there is none."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(output: str, style: str) -> str | None:
    """The model's final answer: the last \\boxed{}; with style "gsm8k", else its last number."""
    boxed = last_boxed(output)
    if boxed is not None or style != "gsm8k":
        return boxed
    return last_number(output)


def is_equivalent(answer: str | None, gold: str, style: str = "math") -> bool:
    """Whether `answer` equals `gold` mathematically, by math-verify; exact text equality as a last resort
    when neither parses. With style "gsm8k", digit-group commas are thousands separators ("1,000" = 1000)."""
    if answer is None:
        return False
    answer = answer.strip().removesuffix(".")  # \boxed{7.}: the sentence's full stop, not a decimal point
    if style == "gsm8k":
        answer = THOUSANDS.sub("", answer)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify bounds each parse and comparison with signal.alarm, which only works on the main thread.
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    parsed_gold = parse(f"\\boxed{{{gold}}}", config, parsing_timeout=seconds)
    parsed_answer = parse(f"\\boxed{{{answer}}}", config, parsing_timeout=seconds)
    if parsed_gold and parsed_answer:
        return bool(verify(parsed_gold, parsed_answer, timeout_seconds=seconds))
    return _plain(answer) == _plain(gold)


def _plain(s: str) -> str:
    return re.sub(r"\s+", "", s).rstrip(".")


def grade(output: str, gold: str, style: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for one model output."""
    answer = extract_answer(output, style)
    return answer, is_equivalent(answer, gold, style)
