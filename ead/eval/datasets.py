"""Benchmarks as lists of `Problem`: MATH-500, the MATH test split, GSM8K test, or a user's JSONL file.

The files live in the shared data folder (see its README for keys and sources) and are never downloaded. This
module knows file formats and gold answers; what counts as a correct answer is `grading.py`'s business.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ead.errors import DatasetError
from ead.eval.grading import gsm8k_gold, last_boxed

# name -> (file in the data folder, answer style); "gsm8k" style falls back to the last number of the output.
BUILTIN = {
    "math500": ("math500_test.jsonl", "math"),
    "math": ("math_test_5000.jsonl", "math"),
    "gsm8k": ("gsm8k_test.jsonl", "gsm8k"),
}


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str
    level: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class Dataset:
    """`name` is what the user passed (a builtin name or a path); `style` how answers are extracted."""

    name: str
    path: Path
    sha256: str
    style: str
    problems: list[Problem]


def default_data_dir() -> Path:
    """`../shared/data` next to the repository that holds this package."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def load_dataset(name: str, data_dir: Path | None = None) -> Dataset:
    """A builtin benchmark by name (math500, math, gsm8k) from `data_dir`, or a JSONL file with `question`
    and `answer` keys (optional `id`, `level`, `subject`). Raises DatasetError naming the fix."""
    if name in BUILTIN:
        filename, style = BUILTIN[name]
        path = (data_dir or default_data_dir()) / filename
        if not path.is_file():
            raise DatasetError(f"{name}: {path} does not exist; set EAD_DATA_DIR to the folder holding {filename} "
                               "(ead never downloads benchmarks)")
    else:
        path, style = Path(name).expanduser(), "gsm8k"
        if path.suffix != ".jsonl" or not path.is_file():
            raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN)} or an existing .jsonl "
                               "file with 'question' and 'answer' keys")
    raw = path.read_bytes()
    rows = _parse_lines(raw.decode("utf-8"), path)
    read = {"math500": _math500, "math": _math, "gsm8k": _gsm8k}.get(name, _user)
    problems = [read(row, i, path) for i, row in enumerate(rows)]
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{path}: id {dup!r} appears more than once; ids must be unique so runs can resume")
    return Dataset(name=name, path=path, sha256=hashlib.sha256(raw).hexdigest(), style=style, problems=problems)


def _parse_lines(text: str, path: Path) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} line {n} is not JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path} line {n} is not a JSON object; write one {{...}} per line")
        rows.append((n, row))
    if not rows:
        raise DatasetError(f"{path} holds no problems; write one JSON object per line")
    return rows


def _need(row: tuple[int, dict], path: Path, *keys: str) -> list[str]:
    n, d = row
    for k in keys:
        if not isinstance(d.get(k), (str, int, float)) or isinstance(d.get(k), bool) or str(d[k]).strip() == "":
            raise DatasetError(f"{path} line {n} lacks a non-empty {k!r} (it has keys {sorted(d)}); every line "
                               f"needs {', '.join(repr(k) for k in keys)}")
    return [str(d[k]) for k in keys]


def _math500(row: tuple[int, dict], i: int, path: Path) -> Problem:
    question, answer, uid = _need(row, path, "problem", "answer", "unique_id")
    d = row[1]
    return Problem(id=uid, question=question, gold=answer, level=_level(d.get("level")), subject=d.get("subject"))


def _math(row: tuple[int, dict], i: int, path: Path) -> Problem:
    question, solution = _need(row, path, "question", "answer")
    gold = last_boxed(solution)
    if gold is None:
        raise DatasetError(f"{path} line {row[0]}: the solution has no \\boxed{{...}} gold answer")
    d = row[1]
    return Problem(id=f"math-{i:04d}", question=question, gold=gold, level=_level(d.get("level")),
                   subject=d.get("type"))


def _gsm8k(row: tuple[int, dict], i: int, path: Path) -> Problem:
    question, solution = _need(row, path, "question", "answer")
    gold = gsm8k_gold(solution)
    if gold is None:
        raise DatasetError(f"{path} line {row[0]}: the answer has no '#### <number>' gold answer")
    return Problem(id=f"gsm8k-{i:04d}", question=question, gold=gold)


def _user(row: tuple[int, dict], i: int, path: Path) -> Problem:
    """A user's line: the gold is the text after '####' or the last \\boxed{} if there is one, else as given."""
    question, answer = _need(row, path, "question", "answer")
    d = row[1]
    gold = gsm8k_gold(answer) if "####" in answer else last_boxed(answer) or answer.strip()
    return Problem(id=str(d.get("id", f"line-{row[0]}")), question=question, gold=gold,
                   level=_level(d.get("level")), subject=d.get("subject"))


def _level(value: object) -> int | None:
    """MATH levels come as 3 or "Level 3"; anything else ("Level ?") is None."""
    text = str(value).removeprefix("Level").strip() if value is not None else ""
    return int(text) if text.isdigit() else None
