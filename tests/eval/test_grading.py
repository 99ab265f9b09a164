"""Answer extraction and equivalence on hand-written pairs whose right verdict is known mathematically."""

import pytest

from ead.eval.grading import extract_answer, grade, grader_info, gsm8k_gold, is_equivalent, last_boxed, last_number

EQUIVALENCE = [
    # gold, answer, equal?
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "0.33", False),  # a rounded decimal is not a third
    ("\\frac{3}{4}", "\\dfrac{3}{4}", True),
    ("\\frac34", "\\dfrac{3}{4}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("(3, \\frac{\\pi}{2})", "(\\frac{\\pi}{2}, 3)", False),  # an ordered pair: order matters
    ("(1, -2)", "(1,-2)", True),
    ("(1, -2)", "(1, 2)", False),
    ("[1, 2)", "[1,2)", True),
    ("[1, 2)", "(1, 2]", False),  # other endpoints included
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),  # a set: order does not matter
    ("5", "5\\text{ cm}", True),
    ("5", "5 \\text{ cm}", True),
    ("5", "6\\text{ cm}", False),
    ("12", "12^\\circ", True),
    ("50", "50\\%", True),
    ("25\\%", "25", True),
    ("-5", "5", False),
    ("-5", "-5", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("-\\frac{1}{2}", "\\frac{1}{2}", False),
    ("10", "10.0", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\pi", "3.14", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\text{(C)}", "C", True),
    ("18", "\\$18.00", True),
]


@pytest.mark.parametrize("gold,answer,equal", EQUIVALENCE)
def test_math_equivalence(gold, answer, equal):
    assert is_equivalent(answer, gold, "math") is equal


GSM8K = [
    ("1000", "1,000", True),
    ("1000000", "1,000,000", True),
    ("1234.5", "\\$1,234.50", True),
    ("1000", "1,001", False),
    ("-3", "-3", True),
    ("-3", "3", False),
    ("7", "7.", True),
    ("18", None, False),  # no answer at all
]


@pytest.mark.parametrize("gold,answer,equal", GSM8K)
def test_gsm8k_equivalence(gold, answer, equal):
    assert is_equivalent(answer, gold, "gsm8k") is equal


@pytest.mark.parametrize("text,boxed", [
    ("so the answer is $\\boxed{42}$.", "42"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "\\left\\{ 1, 2 \\right\\}"),  # escaped braces do not close the box
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("first \\boxed{1}, finally \\boxed{ 2 }", "2"),  # the last box, stripped
    ("\\boxed{3} and then a cut-off \\boxed{\\frac{1}{", "3"),  # unbalanced: the last complete one
    ("\\fbox{7}", "7"),
    ("\\boxed 5$", "5"),
    ("\\boxed{}", None),
    ("no box, just 12", None),
    ("\\boxedx{3}", None),  # another macro
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("text,number", [
    ("She pays $1,000 then 2,500.5 more", "2500.5"),
    ("down to -7 degrees", "-7"),
    ("18.", "18"),
    ("3 apples and 12 pears", "12"),
    ("none", None),
])
def test_last_number(text, number):
    assert last_number(text) == number


def test_gsm8k_answer_is_the_box_or_else_the_last_number():
    assert extract_answer("2+2=4, so \\boxed{4}. Later: 5", "gsm8k") == "4"
    assert extract_answer("She has 1,200 eggs.", "gsm8k") == "1200"
    assert extract_answer("She has 1,200 eggs.", "math") is None  # MATH answers must be boxed


def test_gsm8k_gold_after_the_marks():
    assert gsm8k_gold("9 * 2 = <<9*2=18>>18\n#### 18") == "18"
    assert gsm8k_gold("... #### 1,500") == "1500"
    assert gsm8k_gold("#### $-4") == "-4"
    assert gsm8k_gold("no marks 18") is None


def test_grade_returns_the_answer_and_the_verdict():
    assert grade("Thus the total is \\boxed{\\dfrac{6}{4}}.", "\\frac{3}{2}", "math") == ("\\dfrac{6}{4}", True)
    assert grade("The answer is 1,000.", "1000", "gsm8k") == ("1000", True)
    assert grade("I do not know", "3", "math") == (None, False)


def test_grader_is_named_with_its_version():
    info = grader_info()
    assert info["name"] == "math-verify" and info["version"].count(".") >= 1
