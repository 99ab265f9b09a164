"""Benchmark files: the shared copies load with the gold answers their READMEs describe; bad files say which
line is wrong."""

import hashlib
import json
from pathlib import Path

import pytest

from ead.errors import DatasetError
from ead.eval.datasets import default_data_dir, load_dataset

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_default_data_dir_is_the_shared_folder():
    assert default_data_dir() == DATA


def test_math500():
    d = load_dataset("math500")
    first = d.problems[0]
    assert len(d.problems) == 500 and d.style == "math"
    assert first.id == "test/precalculus/807.json" and first.gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.level == 2 and first.subject == "Precalculus"
    assert d.sha256 == "5f825781e98ae98d39711ce3f9d02ec06743e04b6f3b3cb256f4049079dfa491"  # README's


def test_math_gold_is_the_last_box_of_the_solution():
    d = load_dataset("math")
    assert len(d.problems) == 5000
    assert [p.gold for p in d.problems[:2]] == ["2", "10"]
    assert d.problems[0].level == 3 and d.problems[0].subject == "Algebra"


def test_gsm8k_gold_is_after_the_marks():
    d = load_dataset("gsm8k")
    assert len(d.problems) == 1319 and d.style == "gsm8k"
    assert [p.gold for p in d.problems[:3]] == ["18", "3", "70000"]
    assert d.problems[0].level is None


def test_data_dir_override(tmp_path):
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    d = load_dataset("gsm8k", tmp_path)
    assert [(p.question, p.gold) for p in d.problems] == [("1+1?", "2")]
    assert d.sha256 == hashlib.sha256((tmp_path / "gsm8k_test.jsonl").read_bytes()).hexdigest()
    with pytest.raises(DatasetError, match="EAD_DATA_DIR"):
        load_dataset("math500", tmp_path)


def test_user_file_gold_forms_and_ids(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"question": "a", "answer": "so #### 1,500"}, {"question": "b", "answer": "it is \\boxed{\\frac12}"},
            {"question": "c", "answer": " 7 ", "id": "c7", "level": "Level 4", "subject": "Algebra"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = load_dataset(str(f))
    assert [(p.id, p.gold) for p in d.problems] == [("line-1", "1500"), ("line-2", "\\frac12"), ("c7", "7")]
    assert d.problems[2].level == 4 and d.problems[2].subject == "Algebra" and d.style == "gsm8k"


def test_unknown_name():
    with pytest.raises(DatasetError, match="unknown dataset 'math5000'.*math500, math, gsm8k"):
        load_dataset("math5000")


@pytest.mark.parametrize("lines,match", [
    ([{"question": "a", "answer": "1"}, {"question": "b"}], "line 2 lacks a non-empty 'answer'"),
    ([{"prompt": "a", "answer": "1"}], "line 1 lacks a non-empty 'question'"),
    ([{"question": "a", "answer": "1", "id": "x"}, {"question": "b", "answer": "2", "id": "x"}], "id 'x'"),
    (["not json"], "line 1 is not JSON"),
    ([[1, 2]], "line 1 is not a JSON object"),
])
def test_bad_user_files_name_the_line(tmp_path, lines, match):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(f))
