"""Tests for ead/models/transformer.py and loader.py against tiny random transformers models (no downloads).

Every check compares our logits with an independent reference: transformers' own eager forward over a row's
whole sequence, without any cache, in float32 on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PreTrainedModel, Qwen2Config,
                          Qwen3Config)

from ead.errors import ModelLoadError
from ead.models.kv_cache import KVCache
from ead.models.loader import load_native
from ead.models.transformer import ModelArgs, RopeScaling, Transformer, attention_mask

from conftest import assert_close

PAD_ID = 7  # a real vocabulary id on purpose: padding must be harmless whatever it holds
TINY = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128}
# original_max_position_embeddings=64 puts the 8 rope frequencies of head_dim 16 in all three llama3 bands.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama3": lambda: LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE),
    "qwen2": lambda: Qwen2Config(**TINY),  # q/k/v biases
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True),  # q/k norms, head_dim != 64/4
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),  # MistralConfig defaults to a 4096 window
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build_hf(name: str) -> PreTrainedModel:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
    # transformers starts biases at 0 and norm weights at 1, which would hide a dropped bias or norm.
    with torch.no_grad():
        for param_name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in param_name else p.normal_(0.0, 0.15)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request) -> tuple[PreTrainedModel, Transformer]:
    hf = build_hf(request.param)
    return hf, load_native(hf, "cpu", torch.float32)


@torch.no_grad()
def hf_logits(hf: PreTrainedModel, ids: list[int]) -> Tensor:
    """(T, V): transformers' logits for every position of one sequence, no cache."""
    return hf(torch.tensor([ids]), use_cache=False).logits[0]


@torch.no_grad()
def feed(model: Transformer, cache: KVCache, chunks: list[list[int]], last_only: bool = True) -> Tensor:
    """One forward in which row b gets chunks[b] (maybe empty), right-padded with PAD_ID."""
    B, T = len(chunks), max(1, max(len(c) for c in chunks))
    tokens = torch.full((B, T), PAD_ID, dtype=torch.int64)
    for b, chunk in enumerate(chunks):
        tokens[b, :len(chunk)] = torch.tensor(chunk, dtype=torch.int64)
    valid = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
    cache.check_capacity(range(B), (cache.lengths[:B] + valid).tolist())
    return model(tokens, cache.next_positions(B, T), cache, valid, last_only=last_only)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_matches_hf(models):
    hf, ours = models
    prompt = random_ids(12, seed=1)
    cache = KVCache.for_model(ours.args, max_batch=1, max_seq_tokens=32, dtype=torch.float32, device="cpu")
    with torch.no_grad():  # valid_lengths=None: every token is real
        logits = ours(torch.tensor([prompt]), cache.next_positions(1, len(prompt)), cache)
    assert_close(logits[0], hf_logits(hf, prompt), "prefill")
    assert cache.lengths.tolist() == [12]


def test_cached_decode_matches_full_forward(models):
    hf, ours = models
    seq = random_ids(6, seed=2)
    cache = KVCache.for_model(ours.args, max_batch=1, max_seq_tokens=32, dtype=torch.float32, device="cpu")
    logits = feed(ours, cache, [seq])[0]
    for step in range(8):
        ref = hf_logits(hf, seq)[-1]
        assert_close(logits, ref, f"decode step {step}")
        assert logits.argmax().item() == ref.argmax().item(), f"greedy token differs at step {step}"
        seq.append(int(ref.argmax()))
        logits = feed(ours, cache, [[seq[-1]]])[0]


def test_ragged_batch_matches_each_row_alone(models):
    hf, ours = models
    seqs = [random_ids(n, seed=10 + n) for n in (5, 9, 3)]
    cache = KVCache.for_model(ours.args, max_batch=4, max_seq_tokens=32, dtype=torch.float32, device="cpu")
    full = feed(ours, cache, seqs + [[]], last_only=False)  # (4, 9, V), rows right-padded; row 3 never used
    assert torch.isfinite(full[3]).all(), "an empty idle row must give finite garbage, not NaN"
    for b, seq in enumerate(seqs):
        assert_close(full[b, :len(seq)], hf_logits(hf, seq), f"ragged prefill row {b}")

    # Row 0 decodes one token, row 1 catches up on four, row 2 idles; then all three move by different counts.
    for rnd, extra in enumerate([[[11], [12, 13, 14, 15], []], [[16, 17, 18], [19], [20, 21]]]):
        last = feed(ours, cache, extra)
        assert torch.isfinite(last).all(), "an idle row's garbage logits must still be finite"
        for b, chunk in enumerate(extra):
            seqs[b] += chunk
            if chunk:
                assert_close(last[b], hf_logits(hf, seqs[b])[-1], f"ragged round {rnd} row {b}")
        assert cache.lengths[:3].tolist() == [len(s) for s in seqs]


def test_reset_row_then_reuse_equals_fresh_cache(models):
    hf, ours = models
    old, new, other = random_ids(10, seed=3), random_ids(4, seed=4), random_ids(7, seed=5)
    cache = KVCache.for_model(ours.args, max_batch=2, max_seq_tokens=32, dtype=torch.float32, device="cpu")
    feed(ours, cache, [other, old])
    cache.reset_row(1)
    reused = feed(ours, cache, [[1], new])[1]  # slots 4..9 of row 1 still hold `old`'s keys
    fresh_cache = KVCache.for_model(ours.args, max_batch=1, max_seq_tokens=32, dtype=torch.float32, device="cpu")
    fresh = feed(ours, fresh_cache, [new])[0]
    torch.testing.assert_close(reused, fresh, rtol=0, atol=1e-5)
    assert_close(reused, hf_logits(hf, new)[-1], "reused row vs hf")
    assert_close(feed(ours, cache, [[], [9]])[1], hf_logits(hf, new + [9])[-1], "decode after reuse")


def test_padding_past_a_full_row_goes_to_the_trash_slot():
    hf = build_hf("llama")
    ours = load_native(hf, "cpu", torch.float32)
    full, short = random_ids(9, seed=6), random_ids(2, seed=7)
    cache = KVCache.for_model(ours.args, max_batch=2, max_seq_tokens=10, dtype=torch.float32, device="cpu")
    k_ptr = cache.k.data_ptr()
    feed(ours, cache, [full, short])
    # Row 0 fills its last slot; its two pads sit at positions 10 and 11, past the cache, and must not wrap.
    last = feed(ours, cache, [[3], [4, 5, 6]])
    assert_close(last[0], hf_logits(hf, full + [3])[-1], "full row")
    assert_close(last[1], hf_logits(hf, short + [4, 5, 6])[-1], "short row")
    assert cache.k.data_ptr() == k_ptr, "forward must write the cache in place"


def test_attention_mask_by_hand():
    # Row 0: cached length 2, feeds 2 real tokens. Row 1: empty and idle, 2 pads. 4 cache slots + trash slot 4.
    positions = torch.tensor([[2, 3], [0, 1]])
    is_real = torch.tensor([[True, True], [False, False]])
    expected = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],
                             [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]], dtype=torch.bool)
    # torch 2.13's CPU attention returns zeros for an all-False row, but CUDA kernels may return NaN,
    # so slot 0, which keeps pad rows non-empty, is checked here rather than through logits.
    assert torch.equal(attention_mask(positions, is_real, n_slots=5)[:, 0], expected)
    # A shorter attended span (kv_len) cuts the same mask: the real queries' slots all lie inside it.
    assert torch.equal(attention_mask(positions, is_real, n_slots=4)[:, 0], expected[..., :4])


@pytest.mark.parametrize("folded", [False, True])
def test_attention_with_grouped_heads_by_hand(folded):
    """`attend` (SDPA with grouped heads, or with the query heads folded as CUDA passes run it) against softmax
    attention written out: 6 query heads over 2 key/value heads, each query head reading its group's head, under an
    additive mask that hides a different set of keys per row and token."""
    from ead.models.transformer import attend, fold_mask

    gen = torch.Generator().manual_seed(3)
    B, H, H_kv, T, L, D = 2, 6, 2, 3, 5, 4
    q, k, v = (torch.randn(*shape, generator=gen) for shape in ((B, H, T, D), (B, H_kv, L, D), (B, H_kv, L, D)))
    hidden = torch.rand(B, 1, T, L, generator=gen) < 0.4
    hidden[..., 0] = False  # every query sees at least one key
    mask = torch.zeros(B, 1, T, L).masked_fill(hidden, -math.inf)
    ref = torch.empty(B, H, T, D)
    for b in range(B):
        for h in range(H):
            g = h // (H // H_kv)
            weights = torch.softmax(q[b, h] @ k[b, g].T / math.sqrt(D) + mask[b, 0], dim=-1)  # (T, L)
            ref[b, h] = weights @ v[b, g]
    assert torch.allclose(attend(q, k, v, fold_mask(mask, H // H_kv) if folded else mask, folded), ref, atol=1e-5)


def test_from_hf_config_reads_rope_heads_and_ties():
    llama3 = ModelArgs.from_hf_config(CONFIGS["llama3"]())
    assert llama3.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64) and llama3.rope_theta == 10000.0
    # transformers 5 still accepts the 4.x keywords and folds them into rope_parameters.
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    legacy = LlamaConfig(**TINY, rope_theta=10000.0, rope_scaling=scaling)
    assert ModelArgs.from_hf_config(legacy) == llama3
    qwen3 = ModelArgs.from_hf_config(CONFIGS["qwen3"]())
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.tie_word_embeddings, qwen3.qkv_bias) == (32, True, True, False)
    assert ModelArgs.from_hf_config(CONFIGS["qwen2"]()).qkv_bias
    assert CONFIGS["mistral"]().sliding_window is None  # we run full attention; a window would change the math


def test_tied_embeddings_share_one_tensor():
    ours = load_native(build_hf("qwen3"), "cpu", torch.float32)
    assert ours.output.weight is ours.tok_embeddings.weight


def test_unsupported_model_type_and_settings_are_named():
    with pytest.raises(ModelLoadError, match=r"'gpt2'.*llama, qwen2, qwen3, mistral"):
        ModelArgs.from_hf_config(GPT2Config())
    with pytest.raises(ModelLoadError, match=r"attention_bias=True"):
        ModelArgs.from_hf_config(LlamaConfig(**TINY, attention_bias=True))


def test_shape_mismatch_names_tensor_and_shapes():
    hf = build_hf("llama")
    hf.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(100, 64))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(100, 64\).*\(128, 64\)"):
        load_native(hf, "cpu", torch.float32)


def test_compiled_kernels_give_the_eager_logits_on_cpu(one_thread):
    """Transformer.fuse() (torch.compile'd elementwise kernels, the CUDA path) against the eager functions, on
    a ragged prefill and a decode step with a short attended span; qk-norm included (Qwen3)."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     intermediate_size=64, qk_norm=True, qkv_bias=True)
    model = Transformer(args).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.1)

    def run():
        cache = KVCache.for_model(args, 2, 64, torch.float32, "cpu")
        with torch.no_grad():
            a = model(torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]), torch.tensor([[0, 1, 2, 3]] * 2), cache,
                      torch.tensor([4, 2]), last_only=True)
            b = model(torch.tensor([[7], [8]]), cache.lengths[:, None].clone(), cache, torch.tensor([1, 1]),
                      last_only=True, kv_len=16)
        return torch.cat([a, b])

    eager = run()
    fused = model.fuse().kernels
    compiled = run()
    assert model.kernels is fused
    assert (compiled - eager).abs().max().item() <= 1e-5 * eager.abs().max().item()
