"""Shared fixtures: tiny random models of each supported architecture, saved as HF folders, no downloads.

Each architecture gets a small and a large model that share one tokenizer (a byte-level BPE trained here on
GSM8K questions, with a ChatML chat template), so a pair loads exactly as a user's pair would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def gsm8k_questions(n: int) -> list[str]:
    with open(DATA / "gsm8k_train.jsonl") as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f)]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, max_rel_err: float = 1e-4) -> None:
    """Fail unless max |ours - ref| <= max_rel_err * max |ref| (float32 parity), naming the first mismatch."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    scale = ref.abs().max()
    if diff.max() > max_rel_err * scale:
        first = tuple((diff > max_rel_err * scale).nonzero()[0].tolist())
        pytest.fail(f"{what}: max abs diff {diff.max():.3e} (max rel err {diff.max() / scale:.3e} > {max_rel_err}); "
                    f"first mismatch at index {first}")


def first_train_problem() -> tuple[list[dict], str]:
    """The first GSM8K train question as chat messages with the evaluation's instruction, and its gold answer:
    the real-pair end-to-end example of every backend (the pair answers it right at the default tau)."""
    with open(DATA / "gsm8k_train.jsonl") as f:
        row = json.loads(f.readline())
    messages = [{"role": "user", "content": row["question"] +
                 "\nPlease reason step by step, and put your final answer within \\boxed{}."}]
    return messages, row["answer"].split("####")[-1].strip()


def assert_both_models_wrote_the_right_answer(res, gold: str) -> None:
    """The real-pair end-to-end check of every backend: the answer to `first_train_problem` ends on its own,
    both models wrote and each took over at least once, the boxed answer is the gold one, and it cost less than
    the large model alone."""
    from ead.config import Role

    s = res.stats
    assert res.finish_reason == "stop", res.text
    assert s.tokens_small > 0 and s.tokens_large > 0 and s.switches >= 2
    assert {e.to for e in res.trace.switches} == {Role.SMALL, Role.LARGE}
    assert f"\\boxed{{{gold}}}" in res.text.replace("\\$", "").replace("$", ""), res.text
    assert 0 < s.cost_ratio < 1


def build_tokenizer(vocab_size: int, corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_model(arch: str, vocab_size: int, hidden: int, layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"rope_scaling": None} if arch != "llama" else {}
    cfg = CONFIGS[arch](vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=hidden // 4, max_position_embeddings=256, initializer_range=0.3,
                        tie_word_embeddings=False, eos_token_id=2, bos_token_id=0, pad_token_id=0, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_near_copy(large: str, folder: Path) -> str:
    """A copy of the model in folder `large` with a noisy output head, saved with its tokenizer in `folder`: as
    the small model of a speculation pair, its greedy drafts are accepted about half the time (two random
    models' about never), so acceptance and rollback both run."""
    model = AutoModelForCausalLM.from_pretrained(large)
    with torch.no_grad():
        w = model.lm_head.weight
        w += 0.3 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(large).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def one_thread():
    """Tensors this small cost less than waking a second thread: on a busy 2-core box two intra-op threads
    made tests/models/test_transformer.py 15x slower (about 15 s instead of 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tiny_pairs):
    """The tiny qwen2 pair on the CPU (a module may define its own `pair`)."""
    import ead

    return ead.load_pair(*tiny_pairs["qwen2"], device="cpu")


@pytest.fixture(scope="module")
def prompts(pair):
    """Five prompts of different lengths (more than the batches of the scheduling tests hold, so some wait for a
    slot)."""
    return [pair.encode(q[: 40 + 37 * i]) for i, q in enumerate(gsm8k_questions(5))]


def scripted_costs(engine, small_s: float, large_s: float, per_token: float = 0.0):
    """Fix the costs a BatchEngine's scheduler reads (seconds per step of each model, seconds per catch-up token of
    the large one) and stop measuring them, so that its choices do not depend on this machine's timing."""
    from ead.config import Role

    engine.step_seconds = {Role.SMALL: small_s, Role.LARGE: large_s}
    engine._measure = lambda role, seconds: None
    engine.large_costs = lambda: (large_s, per_token)
    return engine


def switching_config(pair, prompt: list[int], params):
    """tau at the median entropy of a small-only run of `prompt`, so that every row switches, each at its own
    steps (window 2, dwell 2)."""
    import math

    import numpy as np

    from ead.config import RouterConfig
    from ead.engine import Engine

    probe = Engine(pair, RouterConfig(threshold_bits=math.inf)).generate(prompt, params)
    tau = float(np.median([s.entropy_bits for s in probe.trace.steps]))
    return RouterConfig(threshold_bits=tau, window_tokens=2, min_dwell_tokens=2)


@pytest.fixture(scope="session")
def tokenizer_corpus() -> list[str]:
    return gsm8k_questions(400)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory, tokenizer_corpus) -> dict[str, tuple[str, str]]:
    """arch -> (small folder, large folder): 1 layer of width 32 and 2 layers of width 64, one tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(384, tokenizer_corpus)
    pairs = {}
    for i, arch in enumerate(ARCHS):
        folders = []
        for name, hidden, layers in (("small", 32, 1), ("large", 64, 2)):
            folder = root / f"{arch}-{name}"
            build_model(arch, len(tok), hidden, layers, seed=100 + 10 * i + layers).save_pretrained(folder)
            tok.save_pretrained(folder)
            folders.append(str(folder))
        pairs[arch] = (folders[0], folders[1])
    return pairs


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory, tokenizer_corpus) -> str:
    """A qwen2 model whose tokenizer was trained on other text, so its vocabulary differs."""
    folder = tmp_path_factory.mktemp("other") / "qwen2-other"
    tok = build_tokenizer(384, [q[::-1] for q in tokenizer_corpus])
    build_model("qwen2", len(tok), 32, 1, seed=7).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
