"""Tests for ead/models/graphs.py (GPU only): a replayed decode step equals the eager one.

The reference is the same NativeBatchRunner with `cuda_graphs=False`, run step for step beside it, and for the engine
transformers itself in float32. No downloads: tiny random models and a tokenizer trained here on made-up text.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ead
from ead.config import EngineConfig, Role, RouterConfig, SpeculativeConfig
from ead.engine import Engine
from ead.models.loader import load_native
from ead.runner import NativeBatchRunner
from ead.sampling import SamplingParams

from conftest import build_model, build_tokenizer, save_near_copy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = "Tom has 3 red apples and 5 green pears; he gives two apples to Ann and buys seven more pears."


def native_model(arch: str, dtype: torch.dtype):
    hf = build_model(arch, vocab_size=512, hidden=128, layers=3, seed=1).to("cuda", dtype)
    return load_native(hf, hf.device, dtype)


def feed(runner: NativeBatchRunner, ids: list[int]) -> torch.Tensor:
    """Slot 0's logits after `ids`: (V,)."""
    return runner.feed_many([0], [ids])[0]


def greedy(runner: NativeBatchRunner, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens; after the 5th, a 4-token catch-up chunk before one-token steps resume."""
    runner.reset(0)
    logits, tokens, seen = feed(runner, prompt), [], []
    for i in range(n):
        tokens.append(int(logits.argmax()))
        seen.append(logits.clone())
        logits = feed(runner, [tokens[-1], 17, 18, 19] if i == 5 else [tokens[-1]])
    return tokens, torch.stack(seen)


def assert_same_tokens_and_close_logits(a, b, what: str) -> None:
    (tok_a, log_a), (tok_b, log_b) = a, b
    first = next((i for i, (x, y) in enumerate(zip(tok_a, tok_b)) if x != y), None)
    diff = (log_a - log_b).abs().max().item()
    assert first is None, f"{what}: first differing token at step {first}; max abs logit diff {diff:.3e}"
    assert diff <= 1e-2 * log_b.abs().max().item(), f"{what}: max abs logit diff {diff:.3e}"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_graph_replay_equals_eager(arch, dtype):
    model = native_model(arch, dtype)
    graphed = NativeBatchRunner(model, 512, max_seq_tokens=128, cuda_graphs=True)
    eager = NativeBatchRunner(model, 512, max_seq_tokens=128, cuda_graphs=False)
    assert graphed.use_graphs and not eager.use_graphs
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    for _ in range(2):  # a second sequence reuses the cache after reset
        assert_same_tokens_and_close_logits(greedy(graphed, prompt, 40), greedy(eager, prompt, 40), f"{arch}")


def test_capture_mid_sequence_leaves_the_cache_as_it_was():
    model = native_model("llama", torch.bfloat16)
    runner, eager = (NativeBatchRunner(model, 512, max_seq_tokens=128, cuda_graphs=graphs) for graphs in (True, False))
    prompt = list(range(30, 45))
    feed(runner, prompt), feed(eager, prompt)
    k, v, lengths = runner.cache.k.clone(), runner.cache.v.clone(), runner.cache.lengths.clone()
    assert (1, 1, runner.span(len(prompt) + 1)) not in runner.graphs
    runner._graph(1, 1, runner.span(len(prompt) + 1))  # the decode graph, captured mid-sequence
    real = slice(0, runner.cache.trash_slot)  # warm-up may write the trash slot, nothing else
    assert torch.equal(runner.cache.k[:, :, :, real], k[:, :, :, real])
    assert torch.equal(runner.cache.v[:, :, :, real], v[:, :, :, real])
    assert torch.equal(runner.cache.lengths, lengths)
    for token in (5, 6, 7, 8):
        ours, ref = feed(runner, [token]), feed(eager, [token])
        assert torch.equal(ours.argmax(), ref.argmax()) and runner.cache.lengths.tolist() == runner.seen


@pytest.fixture(scope="module")
def cuda_pair_folders(tmp_path_factory) -> tuple[str, str]:
    words = "apples pears Tom Ann has gives buys red green more seven two three five and he she to".split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, size=12)) + "." for _ in range(300)] + [PROMPT]
    tok = build_tokenizer(300, corpus)
    folders = []
    for name, hidden, layers in (("small", 64, 2), ("large", 128, 3)):
        folder = tmp_path_factory.mktemp("cuda") / name
        build_model("qwen2", len(tok), hidden, layers, seed=layers).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(str(folder))
    return folders[0], folders[1]


def test_engine_with_graphs_equals_without_and_matches_transformers_in_float32(cuda_pair_folders):
    pair = ead.load_pair(*cuda_pair_folders, device="cuda", dtype="float32")
    ids, params = pair.encode(PROMPT), SamplingParams(max_new_tokens=60, ignore_eos=True)
    probe = Engine(pair, RouterConfig(threshold_bits=math.inf), EngineConfig(backend="hf")).generate(ids, params)
    tau = float(np.median([s.entropy_bits for s in probe.trace.steps]))
    cfg = RouterConfig(threshold_bits=tau, window_tokens=2, min_dwell_tokens=2)
    auto = Engine(pair, cfg)
    assert auto.backend == "native" and all(r.use_graphs for r in auto.runners.values())
    runs = {"graphs": auto.generate(ids, params),
            "eager": Engine(pair, cfg, EngineConfig(backend="native", cuda_graphs=False)).generate(ids, params),
            "hf": Engine(pair, cfg, EngineConfig(backend="hf")).generate(ids, params)}
    assert {s.role for s in runs["graphs"].trace.steps} == {Role.SMALL, Role.LARGE}
    for name in ("eager", "hf"):
        assert runs["graphs"].token_ids == runs[name].token_ids, f"graphs vs {name}"
        assert [s.role for s in runs["graphs"].trace.steps] == [s.role for s in runs[name].trace.steps]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_batched_graphs_with_fused_kernels_equal_eager_unfused_rows(arch):
    """NativeBatchRunner with decode graphs per (batch, span) bucket and compiled kernels, against the same
    runner eager and unfused, float32: ragged prefills, catch-up with different lags, idle rows."""
    from ead.runner import NativeBatchRunner

    hf = build_model(arch, vocab_size=512, hidden=128, layers=3, seed=1).to("cuda", torch.float32)
    hf.config.max_position_embeddings = 1024  # rope is computed on the fly; room for two span buckets
    fast = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=600, cuda_graphs=True, max_batch=4, fused_kernels=True)
    slow = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=600, cuda_graphs=False, max_batch=4)
    assert fast.model.kernels is not slow.model.kernels
    gen = torch.Generator().manual_seed(5)
    ids = {s: torch.randint(0, 512, (n,), generator=gen).tolist() for s, n in {0: 9, 1: 30, 2: 4}.items()}
    feeds = [ids, {1: [7], 2: [8, 9, 10]}]
    for i in range(300):  # one token per row, with slot 0 catching up 5 tokens every 50 steps; past span 256
        feeds.append({0: [11, 12, 13, 14, 15]} if i % 50 == 0 else {0: [i % 500 + 1], 2: [i % 300 + 2]})
    for k, call in enumerate(feeds):
        slots = list(call)
        a, b = fast.feed_many(slots, [call[s] for s in slots]), slow.feed_many(slots, [call[s] for s in slots])
        diff = (a - b).abs().max().item()
        assert diff <= 1e-3 * b.abs().max().item(), f"call {k}: max abs logit diff {diff:.3e}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"call {k}: argmax differs"
    assert fast.seen == slow.seen and len(fast.graphs) >= 2  # spans 256 and 512 were both used



def test_a_catch_up_too_wide_for_one_graph_replays_graphs_in_chunks_and_equals_eager():
    """Rows bringing 300, 290 and 10 tokens (a row that rode a long phase of large rounds, with its prompt): too
    wide for one graph (256 a row at most). They run as three graph replays: every row's first 128 tokens (a
    bucket of 4 rows), the long rows' next 128, then their last 44 and 34 (a bucket of 64): 512 + 256 + 256 padded
    tokens (`_plan` by hand), against three eager passes of at least what the launches cost, some thousands of
    tokens of this tiny model's compute. Logits equal the eager runner's."""
    from ead.runner import NativeBatchRunner

    hf = build_model("qwen2", vocab_size=512, hidden=128, layers=3, seed=2).to("cuda", torch.float32)
    hf.config.max_position_embeddings = 1024
    fast = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=600, cuda_graphs=True, max_batch=4, fused_kernels=True)
    slow = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=600, cuda_graphs=False, max_batch=4)
    gen = torch.Generator().manual_seed(6)
    for lengths in ([3, 5, 2], [300, 290, 10], [1, 1, 1]):
        ids = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
        before = set(fast.graphs)
        a, b = fast.feed_many([0, 1, 2], ids), slow.feed_many([0, 1, 2], ids)
        diff = (a - b).abs().max().item()
        assert diff <= 1e-3 * b.abs().max().item(), f"{lengths}: max abs logit diff {diff:.3e}"
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        if lengths[0] == 300:
            span = fast.span(305)
            new = {key for key in set(fast.graphs) - before if key[2] == span}  # not calibrate_eager's
            assert new == {(4, 128, span), (2, 128, span), (2, 64, span)}
    assert fast.seen[:3] == slow.seen[:3] == [304, 296, 13]


def test_a_catch_up_of_the_caches_first_rows_runs_over_them_in_place_and_equals_eager():
    """A round that feeds rows 3, 0, 2 and 1 two tokens and one each (a large round after a small one) fills the
    4-row bucket: it replays the prefix graph, batch row b = cache row b, attention on the cache in place. Rows 1
    and 3 alone do not (rows 0 and 2 would ride idle in a bucket of 4 for 2 rows): the compact graph. Logits equal
    the eager runner's either way."""
    from ead.runner import NativeBatchRunner

    hf = build_model("llama", vocab_size=512, hidden=128, layers=3, seed=3).to("cuda", torch.float32)
    hf.config.max_position_embeddings = 1024
    fast = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=300, cuda_graphs=True, max_batch=4, fused_kernels=True)
    slow = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=300, cuda_graphs=False, max_batch=4)
    gen = torch.Generator().manual_seed(7)
    calls = [([0, 1, 2, 3], [9, 4, 12, 6]), ([3, 0, 2, 1], [2, 1, 2, 2]), ([1, 3], [3, 2]), ([2, 0, 1, 3], [1] * 4)]
    for k, (slots, lengths) in enumerate(calls):
        ids = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
        prefix, compact = len(fast.prefix_graphs), len(fast.graphs)
        a, b = fast.feed_many(slots, ids), slow.feed_many(slots, ids)
        diff = (a - b).abs().max().item()
        assert diff <= 1e-3 * b.abs().max().item(), f"call {k}: max abs logit diff {diff:.3e}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"call {k}"
        if k == 1:
            assert (4, 2, 256) in fast.prefix_graphs and len(fast.graphs) == compact
        if k == 2:
            assert (2, 4, 256) in fast.graphs and len(fast.prefix_graphs) == prefix
    assert fast.seen == slow.seen == [11, 10, 15, 11]

def test_batch_engine_on_cuda_equals_hf_engine_row_by_row(tiny_pairs):
    """Rows of different lengths through the native batched engine on CUDA (graphs, fused kernels) write
    the tokens transformers' engine on the CPU writes for each alone, float32."""
    from ead.engine import BatchEngine

    cpu = ead.load_pair(*tiny_pairs["qwen2"], device="cpu")
    gpu = ead.load_pair(*tiny_pairs["qwen2"], device="cuda", dtype="float32")
    prompts = [cpu.encode(PROMPT[: 20 + 15 * i]) for i in range(5)]
    probe = Engine(cpu, RouterConfig(threshold_bits=math.inf)).generate(prompts[0], SamplingParams(max_new_tokens=30))
    cfg = RouterConfig(threshold_bits=float(np.median([s.entropy_bits for s in probe.trace.steps])),
                       window_tokens=2, min_dwell_tokens=2)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    alone = [Engine(cpu, cfg, EngineConfig(backend="hf")).generate(p, params) for p in prompts]
    together = BatchEngine(gpu, cfg, EngineConfig(backend="native"), max_batch=4).generate_many(prompts, params)
    assert sum(r.stats.switches for r in together) > 0
    for i, (a, b) in enumerate(zip(alone, together)):
        assert b.token_ids == a.token_ids, f"row {i}"


def test_verification_graphs_equal_eager_unfused_passes():
    """Speculation's verification passes (every position's logits, `all_logits`) replayed from graphs with
    compiled kernels, against the same runner eager and unfused, float32: rows of different lengths, drafts of
    1 to 12 tokens (width buckets 4, 8 and 16), rows rolled back between passes as speculation does, two spans."""
    hf = build_model("qwen2", vocab_size=512, hidden=128, layers=3, seed=1).to("cuda", torch.float32)
    hf.config.max_position_embeddings = 1024  # rope is computed on the fly; room for two span buckets
    fast = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=600, cuda_graphs=True, max_batch=4, fused_kernels=True)
    slow = NativeBatchRunner.from_hf(hf, 512, max_seq_tokens=600, cuda_graphs=False, max_batch=4)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (20, 40, 9)]
    for runner in (fast, slow):  # wider than any verification bucket: eager in both
        runner.feed_many([0, 1, 2], prompts, all_logits=True)
    assert not fast.verify_graphs
    for step in range(120):
        slots = [0, 1, 2] if step % 3 else [2, 0]
        ids = [torch.randint(0, 512, (1 + (step + s) % 12,), generator=gen).tolist() for s in slots]
        a, b = fast.feed_many(slots, ids, all_logits=True), slow.feed_many(slots, ids, all_logits=True)
        for s, x, y in zip(slots, a, b):
            diff = (x - y).abs().max().item()
            assert x.shape == y.shape and diff <= 1e-3 * y.abs().max().item(), f"step {step}, slot {s}: {diff:.3e}"
            assert torch.equal(x.argmax(-1), y.argmax(-1)), f"step {step}, slot {s}: argmax differs"
        for s, t in zip(slots, ids):  # reject the end of the draft
            for runner in (fast, slow):
                runner.truncate(s, runner.seen[s] - step % len(t))
    assert fast.seen == slow.seen and fast.cache.lengths.tolist() == slow.cache.lengths.tolist()
    assert {w for _, w, _ in fast.verify_graphs} == {4, 8, 16} and {s for *_, s in fast.verify_graphs} == {256, 512}


def test_speculative_engine_replays_captured_verification_graphs_and_writes_the_large_models_text(
        tiny_pairs, tmp_path, monkeypatch):
    """Rows of different lengths through speculation on CUDA (graphs captured ahead by warm_up, fused kernels),
    float32: the text is transformers' large-only greedy text on the CPU, and the verification passes replayed
    graphs captured before the run (none was captured during it)."""
    from ead.engine import BatchEngine

    large = tiny_pairs["qwen2"][1]
    near = save_near_copy(large, tmp_path / "near")
    cpu, gpu = ead.load_pair(near, large, device="cpu"), ead.load_pair(near, large, device="cuda", dtype="float32")
    prompts = [cpu.encode(PROMPT[: 20 + 15 * i]) for i in range(5)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    large_only = RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=Role.LARGE)
    refs = BatchEngine(cpu, large_only, EngineConfig(backend="hf"), max_batch=1).generate_many(prompts, params)
    engine = BatchEngine(gpu, RouterConfig(), EngineConfig(backend="native"), max_batch=4, mode="speculative",
                         speculative=SpeculativeConfig(4))
    engine.warm_up(max(map(len, prompts)) + params.max_new_tokens + 1)
    runner = engine.runners[Role.LARGE]
    captured = set(runner.verify_graphs)
    assert captured and not engine.runners[Role.SMALL].verify_graphs
    replays = []
    graph = runner._graph
    monkeypatch.setattr(runner, "_graph", lambda *a, **k: replays.append(k.get("all_logits", False)) or graph(*a, **k))
    results = engine.generate_many(prompts, params)
    assert any(replays) and set(runner.verify_graphs) == captured
    for i, (ref, res) in enumerate(zip(refs, results)):
        assert res.token_ids == ref.token_ids, f"row {i}"
    assert 0 < sum(r.stats.accepted_tokens for r in results) < sum(r.stats.draft_tokens for r in results)
