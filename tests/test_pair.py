"""Loading a pair: sources, tokenizer agreement, prompts, and the errors a user meets first."""

import pytest
import torch

import ead
from ead.config import RouterConfig
from ead.engine import Engine
from ead.errors import CacheCapacityError, ConfigError, ModelLoadError, RequestError, TokenizerMismatchError
from ead.pair import end_of_sequence_ids, place_models
from ead.sampling import SamplingParams


def test_mismatched_tokenizers_are_refused_naming_the_first_different_token(tiny_pairs, other_tokenizer_model):
    small, _ = tiny_pairs["qwen2"]
    with pytest.raises(TokenizerMismatchError, match=r"disagree on token id \d+: '.*' vs '.*'.*one family"):
        ead.load_pair(small, other_tokenizer_model, device="cpu")


def test_missing_paths_name_the_path_and_what_to_pass(tmp_path, tiny_pairs):
    small, _ = tiny_pairs["qwen2"]
    with pytest.raises(ModelLoadError, match=r"no_such\.gguf.*does not exist.*hub id"):
        ead.load_pair(small, str(tmp_path / "no_such.gguf"), device="cpu")
    with pytest.raises(ModelLoadError, match=r"no such file or folder.*hub id"):
        ead.load_pair(small, str(tmp_path / "missing" / "model"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        ead.load_pair(str(tmp_path / "empty"), small, device="cpu")


def test_one_model_alone_is_a_config_error(tiny_pairs):
    with pytest.raises(ead.ConfigError, match="both small and large"):
        ead.load_pair(tiny_pairs["qwen2"][0], None)


def test_bad_device_and_dtype_are_config_errors(tiny_pairs):
    with pytest.raises(ead.ConfigError, match="device"):
        ead.load_pair(*tiny_pairs["qwen2"], device="tpu:7")
    with pytest.raises(ead.ConfigError, match="dtype must be one of"):
        ead.load_pair(*tiny_pairs["qwen2"], device="cpu", dtype="int3")


@pytest.fixture(scope="module")
def qwen_pair(tiny_pairs):
    return ead.load_pair(*tiny_pairs["qwen2"], device="cpu")


def test_prompt_longer_than_the_context_is_refused(qwen_pair):
    ids = qwen_pair.encode("Natalia sold clips. " * 200)
    assert len(ids) > 256
    with pytest.raises(CacheCapacityError, match=rf"prompt has {len(ids)} tokens.*holds 256"):
        Engine(qwen_pair, RouterConfig()).generate(ids)


def test_generation_stops_at_the_context_limit(qwen_pair):
    ids = qwen_pair.encode("Natalia sold clips. " * 10)
    res = Engine(qwen_pair, RouterConfig()).generate(ids, SamplingParams(max_new_tokens=500, ignore_eos=True))
    assert res.finish_reason == "length" and len(ids) + len(res.token_ids) == 256


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ([], "non-empty list"),
    ([{"role": "user"}], "string 'role' and 'content'"),
    ([{"role": "user", "content": ""}], "every chat message is empty"),
])
def test_empty_or_malformed_prompts_are_request_errors(qwen_pair, prompt, message):
    with pytest.raises(RequestError, match=message):
        qwen_pair.encode(prompt)


def test_chat_template_and_end_of_sequence_ids(qwen_pair):
    ids = qwen_pair.encode([{"role": "user", "content": "Hi"}])
    assert qwen_pair.tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert qwen_pair.eos_token_ids == {qwen_pair.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert end_of_sequence_ids(qwen_pair.small) == {2}


def test_parameter_counts_are_recorded(qwen_pair):
    # Independent count from the configs: embeddings + untied head + per-layer weights (see conftest.build_model).
    def count(hidden, layers, vocab=384, heads=4, kv=2):
        hd = hidden // heads
        attn = hidden * heads * hd + 2 * hidden * kv * hd + heads * hd * hidden + (heads + 2 * kv) * hd  # qkv bias
        mlp = 3 * hidden * 2 * hidden
        return 2 * vocab * hidden + layers * (attn + mlp + 2 * hidden) + hidden
    assert (qwen_pair.small.params, qwen_pair.large.params) == (count(32, 1), count(64, 2))


def test_both_models_placed_on_the_cpu_write_what_one_device_writes(tiny_pairs, qwen_pair):
    placed = ead.load_pair(*tiny_pairs["qwen2"], small_device="cpu", large_device="cpu")
    assert placed.device == torch.device("cpu") and placed.small.model.device == torch.device("cpu")
    ids = qwen_pair.encode("Natalia sold clips to 48 of her friends.")
    cfg = RouterConfig(threshold_bits=1.0, window_tokens=2, min_dwell_tokens=2)
    params = SamplingParams(max_new_tokens=24)
    expected, got = (Engine(p, cfg).generate(ids, params) for p in (qwen_pair, placed))
    assert got.token_ids == expected.token_ids
    assert [s.role for s in got.trace.steps] == [s.role for s in expected.trace.steps]


def test_with_several_gpus_the_small_model_gets_its_own(monkeypatch):
    """Placement alone, with the GPUs faked: no tensor is made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device
    assert place_models(None, None, None) == (cuda("cuda", 1), cuda("cuda", 0))
    assert place_models(None, None, "cuda:1") == (cuda("cuda", 0), cuda("cuda", 1))
    assert place_models("cuda", None, None) == (cuda("cuda", 0), cuda("cuda", 0))  # --device: both there
    assert place_models(None, "cuda:0", None) == (cuda("cuda", 0), cuda("cuda", 0))
    assert place_models("cpu", "cuda:1", None) == (cuda("cuda", 1), cuda("cpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert place_models(None, None, None) == (cuda("cuda", 0), cuda("cuda", 0))
    with pytest.raises(ConfigError, match="large_tp must be an integer >= 1, got 0"):
        place_models(None, None, None, large_tp=0)


def test_decode_is_the_tokenizers_decode_special_tokens_left_out(qwen_pair):
    """The pair decodes through the Rust tokenizer directly (the stop checks run it for every token): it must give
    the text transformers' decode gives, on real text, chat markup, cut multi-byte characters and random ids."""
    tok = qwen_pair.tokenizer
    chat = qwen_pair.encode([{"role": "user", "content": "Natalia sold 48 clips, café ✓ \\boxed{72}"}])
    text = tok("Natalia sold clips to 48 of her friends in April. ✓ 日本 \\frac{1}{2}<|im_end|> end").input_ids
    generator = torch.Generator().manual_seed(0)
    random_ids = [torch.randint(0, len(tok), (n,), generator=generator).tolist() for n in (1, 2, 7, 40)]
    cases = [chat, text, *[text[:k] for k in range(1, len(text))], *random_ids]
    for ids in cases:
        assert qwen_pair.decode(ids) == tok.decode(ids, skip_special_tokens=True), ids
    assert "<|im_start|>" not in qwen_pair.decode(chat)


def test_a_tokenizer_that_cleans_up_spaces_decodes_through_transformers(qwen_pair, monkeypatch):
    """Space clean-up (WordPiece's "a , b" -> "a, b") is transformers' post-processing, which the Rust decoder does
    not do: such a tokenizer must go through transformers' decode."""
    tok, calls = qwen_pair.tokenizer, []
    monkeypatch.setattr(tok, "clean_up_tokenization_spaces", True)
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: calls.append(ids) or "from transformers")
    assert qwen_pair.decode([5, 6]) == "from transformers" and calls == [[5, 6]]
