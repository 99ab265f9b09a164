"""The runners' context must hold the prompt and the whole answer budget, or long answers are cut early."""

from types import SimpleNamespace

from ead.eval.cli import PROMPT_ALLOWANCE, answer_budget, eval_context


def pair_with_limits(small: int, large: int) -> SimpleNamespace:
    def model(limit):
        return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit)))

    return SimpleNamespace(small=model(small), large=model(large))


def test_default_budgets_keep_the_runners_default_context():
    pair = pair_with_limits(32768, 32768)
    assert eval_context(pair, None) is None
    assert eval_context(pair, 2048) is None  # 2048 + the prompt fits the default 4096


def test_a_4096_token_budget_gets_room_for_the_prompt_too():
    assert eval_context(pair_with_limits(32768, 32768), 4096) == 4096 + PROMPT_ALLOWANCE


def test_the_context_never_exceeds_the_smaller_models_positions():
    assert eval_context(pair_with_limits(32768, 4608), 8192) == 4608


def test_a_model_without_a_config_llama_cpp_is_not_limited_by_it():
    pair = SimpleNamespace(small=SimpleNamespace(model=object()), large=SimpleNamespace(model=object()))
    assert eval_context(pair, 4096) == 4096 + PROMPT_ALLOWANCE


def test_math_answers_default_to_4096_tokens_and_gsm8k_to_1024():
    args = SimpleNamespace(max_new_tokens=None)
    assert answer_budget(args, SimpleNamespace(name="math500")) == 4096
    assert answer_budget(args, SimpleNamespace(name="gsm8k")) == 1024
    assert answer_budget(SimpleNamespace(max_new_tokens=300), SimpleNamespace(name="math500")) == 300
