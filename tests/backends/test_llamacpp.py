"""The llama.cpp backend against independent references.

Fast tests run on tiny random Qwen2 models (tests/conftest.py) written here as float32 GGUF files, so
transformers, running the very same weights, is the reference. Tests marked `real` run the default pair's
Q4_K_M files, where the reference is llama.cpp's high-level `Llama` evaluating the whole prefix in one pass
(`logits_all`), since transformers' dequantized float32 copy is not what llama.cpp computes.

llama.cpp's logits depend on how tokens are batched (see ead/backends/llamacpp.py), so an EAD run is checked
twice: each feed is replayed with the same chunks in a fresh context of llama.cpp's high-level API (the same
logits up to float32 rounding, so the token must be the active model's argmax, with the entropy the trace
recorded, on exactly what it was fed: catch-up fed every missed token), and each replayed feed is compared
with the single-pass evaluation of the prefix within a stated tolerance of a few tenths of a logit.
"""

import json
import math
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ead
from ead.backends.llamacpp import LlamaCppBatchRunner, LlamaCppModel, LlamaCppRunner
from ead.cli import main
from ead.config import EngineConfig, Role, RouterConfig, SpeculativeConfig
from ead.engine import BatchEngine, Engine
from ead.errors import ConfigError
from ead.router import ScriptedRouter
from ead.runner import ModelRunner, choose_backend

from conftest import assert_both_models_wrote_the_right_answer, first_train_problem, gsm8k_questions, save_near_copy

pytestmark = pytest.mark.usefixtures("one_thread")
LLAMACPP, HF = EngineConfig(backend="llamacpp"), EngineConfig(backend="hf")
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
# float32 weights, float16 KV cache (llama.cpp's default): vs transformers, relative to the largest logit. Over
# longer feeds the cache's rounding adds up: up to 4.1e-3 at single positions of a 45-token feed.
TINY_REL_TOL, TINY_LONG_REL_TOL = 2e-3, 1e-2
# Fed in chunks vs in one pass, in logits: float32 weights (logits up to about 10; measured up to 0.022).
TINY_TOL = 0.1
# Q4_K_M, fed in chunks vs in one pass, in logits. Measured on the GSM8K run below: median |diff| over the
# vocabulary up to 0.12, max |diff| over the top 20 up to 0.77 (over all 152k logits up to 0.94).
REAL_MEDIAN_TOL, REAL_TOP_TOL = 0.25, 1.25


def write_gguf(hf_folder: str, out: Path) -> Path:
    """A float32 GGUF of a transformers Qwen2 model and its byte-level BPE tokenizer, with the tensor names,
    metadata keys and token types of llama.cpp's own converter (convert_hf_to_gguf.py) for Qwen2."""
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_folder)
    c = model.config
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    w.add_token_list(tokens)
    special = set(tok.all_special_tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.pad_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def ggufs(tiny_pairs, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("gguf")
    return tuple(str(write_gguf(f, root / f"{role}.gguf")) for f, role in zip(tiny_pairs["qwen2"], ("small", "large")))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def llama_cpp():
    """Every test but the two on errors needs the package; `make test` installs it (the llamacpp extra)."""
    return pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs pip install 'ead[llamacpp]'")


@pytest.fixture(scope="module")
def pair(llama_cpp, ggufs, cache_root):
    return ead.load_pair(*ggufs, backend="llamacpp", cache_root=cache_root)


@pytest.fixture(scope="module")
def hf_pair(tiny_pairs):
    """The same weights in transformers: the reference for the tiny GGUF files."""
    return ead.load_pair(*tiny_pairs["qwen2"], device="cpu")


def entropy_bits(logits: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum())


def fresh_llama(path: str, n_tokens: int):
    """llama.cpp's high-level API on a context of its own: an implementation independent of ead's runners (its
    own batches, positions and logits buffers). Flash attention and threads as the runners use them."""
    import llama_cpp

    threads = os.cpu_count() or 1
    return llama_cpp.Llama(model_path=path, n_ctx=n_tokens + 1, n_batch=n_tokens + 1, logits_all=True,
                           flash_attn=True, n_threads=threads, n_threads_batch=threads, verbose=False)


def replay(pair, prompt: list[int], res) -> dict[int, np.ndarray]:
    """step index -> logits of that step's feed, recomputed by fresh high-level contexts fed the same chunks in
    order. Also checks each feed brought its model exactly up to the token it wrote (catch-up missed nothing)."""
    full = prompt + res.token_ids
    llms = {role: fresh_llama(m.path, len(full)) for role, m in ((Role.SMALL, pair.small), (Role.LARGE, pair.large))}
    out = {}
    for step in res.trace.steps:
        llm = llms[step.role]
        start = llm.n_tokens
        assert start + step.fed_tokens == len(prompt) + step.index, f"token {step.index} by {step.role.value}: " \
            f"fed up to {start + step.fed_tokens}, wrote at {len(prompt) + step.index}"
        llm.eval(full[start:start + step.fed_tokens])
        out[step.index] = np.array(llm.scores[llm.n_tokens - 1])
    return out


def single_pass(path: str, tokens: list[int]) -> np.ndarray:
    """(T, V) logits of `tokens` evaluated in one llama_decode."""
    llm = fresh_llama(path, len(tokens))
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


def check_run(pair, prompt: list[int], res, median_tol: float, top_tol: float) -> None:
    """The two checks of the module docstring, on every generated token. 1. The token is the argmax, and its
    entropy the entropy, of the logits of a replay of the same chunks. 2. Those logits are close to a single
    pass over the prefix: median |diff| over the vocabulary <= median_tol, max |diff| over the single pass's
    20 best tokens <= top_tol, and where the single pass's best leads by more than 2 * top_tol, the token is
    that best. A wrong catch-up (a token missing or repeated) changes the context and moves most logits."""
    fed = replay(pair, prompt, res)
    full = prompt + res.token_ids
    ref = {role: single_pass(m.path, full) for role, m in ((Role.SMALL, pair.small), (Role.LARGE, pair.large))}
    worst_median = worst_top = 0.0
    for step in res.trace.steps:
        ours, one = fed[step.index], ref[step.role][len(prompt) + step.index - 1]
        where = f"token {step.index} by {step.role.value}"
        assert int(ours.argmax()) == step.token_id, f"{where}: replay argmax {ours.argmax()} != {step.token_id}"
        assert step.entropy_bits == pytest.approx(entropy_bits(ours), abs=1e-3), f"{where}: entropy"
        diff = np.abs(ours - one)
        median, top = float(np.median(diff)), float(diff[np.argsort(-one)[:20]].max())
        worst_median, worst_top = max(worst_median, median), max(worst_top, top)
        assert median <= median_tol and top <= top_tol, f"{where}: logits differ from the single pass by " \
            f"{median:.3f} (median) and {top:.3f} (max over its top 20); tolerances {median_tol:.3f}, {top_tol:.3f}"
        best, second = np.sort(one)[-2:][::-1]
        if best - second > 2 * top_tol:
            assert step.token_id == int(one.argmax()), f"{where}: single pass prefers {one.argmax()} by {best - second:.2f}"
    print(f"fed vs single pass: worst median |diff| {worst_median:.4f}, worst top-20 |diff| {worst_top:.4f}")


def switching_cfg(pair, engine_cfg: EngineConfig, n: int) -> RouterConfig:
    """tau at the median entropy of a small-only run, so both models write (as in tests/test_runner.py)."""
    probe = Engine(pair, RouterConfig(threshold_bits=math.inf), engine_cfg).generate(
        pair.encode(PROMPT), ead.SamplingParams(max_new_tokens=n, ignore_eos=True))
    tau = float(np.median([s.entropy_bits for s in probe.trace.steps]))
    return RouterConfig(threshold_bits=tau, window_tokens=2, min_dwell_tokens=2)


def test_load_pair_makes_llamacpp_handles_with_the_hf_pairs_counts_and_eos(pair, hf_pair):
    for ours, ref in ((pair.small, hf_pair.small), (pair.large, hf_pair.large)):
        assert isinstance(ours.model, LlamaCppModel) and ours.model.device.type == "cpu"
        assert ours.params == ref.params and ours.model.config.vocab_size == ref.model.config.vocab_size
    assert pair.eos_token_ids == hf_pair.eos_token_ids and pair.device.type == "cpu"
    assert Engine(pair, RouterConfig(), EngineConfig()).backend == "llamacpp"  # auto, for GGUF handles


def test_runner_logits_match_transformers_through_prefill_decode_and_catch_up(pair, hf_pair):
    vocab = pair.large.model.config.vocab_size
    ref, ours = ModelRunner(hf_pair.large.model, vocab), LlamaCppRunner(pair.large.model, vocab)
    for chunk in ([5, 9, 40, 41, 7, 3, 100], [12], [13, 14, 15, 16], [2]):
        a, b = ref.feed(chunk), ours.feed(chunk)
        err = ((b - a).abs().max() / a.abs().max()).item()
        assert err < TINY_REL_TOL, f"after feeding {chunk}: max rel err {err:.2e}"
        assert ours.seen == ref.seen and b.shape == (vocab,) and b.dtype == torch.float32
    ours.reset()
    assert ours.seen == 0
    again = ours.feed([5, 9, 40, 41, 7, 3, 100])  # a reset slot starts from position 0 with an empty cache
    first = LlamaCppRunner(pair.large.model, vocab).feed([5, 9, 40, 41, 7, 3, 100])
    assert torch.equal(again, first)


@pytest.mark.parametrize("model", ["small", "large"])
def test_runner_feeds_equal_the_high_level_api_fed_the_same_chunks(pair, model):
    """The runner's batches, positions and logits rows are what llama.cpp's own API makes, up to float32
    rounding: the high-level API (logits_all) runs the last layer on every row of a chunk, the runner on one
    (on the Q4_K_M default pair the two are bit-identical)."""
    handle = getattr(pair, model).model
    vocab = handle.config.vocab_size
    tokens = np.random.default_rng(1).integers(3, vocab, 60).tolist()
    ours, ref = LlamaCppRunner(handle, vocab, max_seq_tokens=64), fresh_llama(str(handle.path), 60)
    for n in (17, 1, 1, 5, 1, 30, 1):
        chunk = tokens[ours.seen: ours.seen + n]
        got = ours.feed(chunk).numpy()
        ref.eval(chunk)
        diff = float(np.abs(got - ref.scores[ref.n_tokens - 1]).max())
        assert diff < 1e-4, f"after {ours.seen} tokens (last chunk {n}): max diff {diff:.2e}"


@pytest.mark.parametrize("router", ["small_only", "large_only"])
def test_single_model_runs_write_the_transformers_tokens(pair, hf_pair, router):
    cfg = {"small_only": RouterConfig(threshold_bits=math.inf),
           "large_only": RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=Role.LARGE)}[router]
    ids, params = hf_pair.encode(PROMPT), ead.SamplingParams(max_new_tokens=40, ignore_eos=True)
    ours, ref = Engine(pair, cfg, LLAMACPP).generate(ids, params), Engine(hf_pair, cfg, HF).generate(ids, params)
    first = next((i for i, (a, b) in enumerate(zip(ref.token_ids, ours.token_ids)) if a != b), None)
    assert first is None, f"first differing token at {first}: hf {ref.token_ids[first]}, llamacpp {ours.token_ids[first]}"


def test_ead_run_with_switches_writes_each_models_choice_on_what_it_was_fed(pair):
    cfg = switching_cfg(pair, LLAMACPP, 60)
    prompt = pair.encode(PROMPT)
    res = Engine(pair, cfg, LLAMACPP).generate(prompt, ead.SamplingParams(max_new_tokens=60, ignore_eos=True))
    assert res.stats.switches >= 4 and {s.to for s in res.trace.switches} == {Role.SMALL, Role.LARGE}
    assert any(s.catchup_tokens > 1 for s in res.trace.switches)
    check_run(pair, prompt, res, median_tol=TINY_TOL, top_tol=TINY_TOL)


def feed_rounds(runner, rounds, full: dict[int, list[int]]) -> list[list[torch.Tensor]]:
    """Run `rounds` of (slot, n_new) through `runner.feed_many`; the tokens come from each slot's `full`."""
    out = []
    for plan in rounds:
        slots = [s for s, _ in plan]
        ids = [full[s][runner.seen[s]: runner.seen[s] + n] for s, n in plan]
        out.append(list(runner.feed_many(slots, ids)))
    return out


# Three slots with different prompt lengths and lags: slot 0 misses rounds and catches up 3 tokens at once,
# slot 1 steps one token at a time and is reset (a new request) in mid-run; slots come in any order.
ROUNDS = [[(0, 7), (1, 3), (2, 12)], [(1, 1), (2, 2)], [(2, 1), (0, 3), (1, 1)], [(1, 1)], [(0, 1), (1, 1), (2, 4)]]


def check_batched(handle: LlamaCppModel, max_err: float, relative: bool) -> None:
    """Each row feed_many returns (3 slots, ROUNDS, then a reset) against a one-slot runner fed the same
    chunks: max |diff| over the vocabulary, relative to the largest logit or in logits."""
    vocab = handle.config.vocab_size
    rng = np.random.default_rng(0)
    full = {s: rng.integers(3, vocab, 40).tolist() for s in range(3)}
    batched = LlamaCppBatchRunner(handle, vocab, max_seq_tokens=64, max_batch=3)
    got = feed_rounds(batched, ROUNDS, full)
    batched.reset(1)
    [[after_reset, _]] = feed_rounds(batched, [[(1, 5), (2, 1)]], {1: full[2], 2: full[2]})
    assert batched.seen == [11, 5, 20]

    def err(row: torch.Tensor, ref: torch.Tensor) -> float:
        return ((row - ref).abs().max() / (ref.abs().max() if relative else 1)).item()

    for s in range(3):
        single = LlamaCppRunner(handle, vocab, max_seq_tokens=64)
        for r, plan in enumerate(ROUNDS):
            if s in dict(plan):
                ref = single.feed(full[s][single.seen: single.seen + dict(plan)[s]])
                e = err(got[r][[slot for slot, _ in plan].index(s)], ref)
                assert e < max_err, f"slot {s}, round {r}: batched row differs from the one-slot run by {e:.2e}"
    e = err(after_reset, LlamaCppRunner(handle, vocab, max_seq_tokens=64).feed(full[2][:5]))
    assert e < max_err, f"slot 1 after its reset differs from a fresh sequence by {e:.2e}"


@pytest.mark.parametrize("model", ["small", "large"])
def test_feed_many_rows_equal_single_slot_runs_of_the_same_chunks(pair, model):
    """float32 weights: equal up to float32 rounding (measured 1.3e-5 of the largest logit). llama.cpp splits
    one llama_decode of several slots into ubatches of equal tokens per slot, so a row is computed beside
    other rows and not exactly as alone; a row that read another slot's cells would be off by whole units."""
    check_batched(getattr(pair, model).model, 1e-4, relative=True)


def test_overflow_is_refused_before_any_work(pair):
    runner = LlamaCppBatchRunner(pair.small.model, 100, max_seq_tokens=8, max_batch=2)
    runner.feed_many([0, 1], [[1, 2, 3, 4, 5, 6], [7]])
    with pytest.raises(ead.CacheCapacityError, match=r"slot 0 holds 6 tokens.*max_seq_tokens=8"):
        runner.feed_many([1, 0], [[8], [7, 8, 9]])
    assert runner.seen == [6, 1]
    assert runner.feed_many([0], [[7, 8]]).shape == (1, 100)


def test_cli_generates_with_backend_llamacpp(capsys, llama_cpp, ggufs, cache_root):
    argv = ["generate", "--small", ggufs[0], "--large", ggufs[1], "--cache-dir", str(cache_root), "--raw",
            "--max-new-tokens", "8", "--backend", "llamacpp", "Natalia sold clips"]
    assert main(argv) == 0
    assert "tokens, large share" in capsys.readouterr().err


def test_non_gguf_models_with_backend_llamacpp_are_a_config_error(capsys, tiny_pairs):
    small, large = tiny_pairs["qwen2"]
    with pytest.raises(ConfigError, match=r"runs GGUF files only.*pass \.gguf files"):
        ead.load_pair(small, large, backend="llamacpp")
    assert main(["generate", "--small", small, "--large", large, "--backend", "llamacpp", "Hi"]) == 2
    assert "ConfigError: backend 'llamacpp' runs GGUF files only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="runs on the CPU"):
        ead.load_pair(small, large, backend="llamacpp", device="meta")


def test_a_pair_loaded_for_one_backend_is_refused_by_another(hf_pair, pair):
    with pytest.raises(ConfigError, match="needs the pair loaded for it"):
        Engine(hf_pair, RouterConfig(), LLAMACPP)
    with pytest.raises(ConfigError, match="needs the pair loaded for it"):
        Engine(pair, RouterConfig(), HF)


def test_missing_llama_cpp_python_says_how_to_install_it(monkeypatch, ggufs, cache_root):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    with pytest.raises(ConfigError, match=r"needs the llama-cpp-python package.*pip install 'ead\[llamacpp\]'"):
        ead.load_pair(*ggufs, backend="llamacpp", cache_root=cache_root)


def test_auto_loads_gguf_into_llamacpp_on_cpu_only_when_installed(monkeypatch, llama_cpp, ggufs, cache_root):
    assert isinstance(ead.load_pair(*ggufs, backend="auto", device="cpu", cache_root=cache_root).small.model,
                      LlamaCppModel)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "llama_cpp" else object())
    from ead.pair import _loads_llamacpp
    assert not _loads_llamacpp("auto", tuple(ggufs), torch.device("cpu"))
    assert choose_backend([object(), object()], "auto", torch.device("cpu")) == "hf"


# --- speculation: truncate and all_logits, then the engine's speculative and hybrid modes ------------------

def test_all_logits_rows_match_transformers_at_every_position_in_one_or_several_decodes(pair, hf_pair,
                                                                                         monkeypatch):
    """Every fed position's logits against transformers' forward of the same weights, for feeds of fewer and of
    more tokens than one decode may return (here 32: 16 per slot), with two slots fed together."""
    vocab = pair.large.model.config.vocab_size
    monkeypatch.setattr("ead.backends.llamacpp.MAX_OUTPUTS", 0)
    runner = LlamaCppBatchRunner(pair.large.model, vocab, max_seq_tokens=64, max_batch=2)
    assert runner.max_outputs == 32
    rng = np.random.default_rng(2)
    full = {s: rng.integers(3, vocab, 60).tolist() for s in range(2)}
    for plan in ([(0, 5), (1, 3)], [(0, 1), (1, 40)], [(1, 2), (0, 20)]):  # 8, 41 and 22 rows
        slots = [s for s, _ in plan]
        ids = [full[s][runner.seen[s]: runner.seen[s] + n] for s, n in plan]
        starts = [runner.seen[s] for s in slots]
        out = runner.feed_many(slots, ids, all_logits=True)
        for s, t, start, got in zip(slots, ids, starts, out):
            with torch.no_grad():
                ref = hf_pair.large.model(torch.tensor([full[s][: start + len(t)]])).logits[0, start:]  # (T, V)
            assert got.shape == (len(t), vocab) and got.dtype == torch.float32
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            assert err < TINY_LONG_REL_TOL, f"slot {s}, tokens {start}..{start + len(t)}: max rel err {err:.2e}"
    assert runner.seen == [26, 45]


@pytest.mark.parametrize("handle", ["tiny", "real"])
def test_truncate_then_refeed_gives_the_logits_of_a_fresh_feed(request, handle):
    """A rejected draft is dropped (its cells leave the KV cache) and other tokens take its positions: the
    logits equal, bit for bit, those of a fresh context fed the same chunks without the draft; a stale cell
    left behind would be attended to and move them. On the real Q4_K_M pair too (same chunks, same kernels)."""
    if handle == "real":
        request.applymarker(pytest.mark.real)
        model = request.getfixturevalue("real_pair").large.model
    else:
        model = request.getfixturevalue("pair").large.model
    vocab = model.config.vocab_size
    rng = np.random.default_rng(3)
    full = {s: rng.integers(3, vocab, 40).tolist() for s in range(3)}
    draft = rng.integers(3, vocab, 6).tolist()
    runner, fresh = (LlamaCppBatchRunner(model, vocab, max_seq_tokens=64, max_batch=3) for _ in range(2))
    for r in (runner, fresh):
        r.feed_many([0, 1, 2], [full[0][:10], full[1][:7], full[2][:12]])
    runner.feed_many([2, 0], [draft[:3], draft], all_logits=True)  # the drafts, read by the large model
    runner.truncate(0, 10)
    runner.truncate(2, 13)  # keeps the first draft token of slot 2 ...
    runner.truncate(2, 12)  # ... then drops it too: truncation in steps
    runner.truncate(1, 7)  # to its own length: a no-op
    assert runner.seen == [10, 7, 12]
    plan = [(0, full[0][10:15]), (2, full[2][12:13]), (1, full[1][7:10])]
    ours = runner.feed_many([s for s, _ in plan], [t for _, t in plan], all_logits=True)
    ref = fresh.feed_many([s for s, _ in plan], [t for _, t in plan], all_logits=True)
    for (s, _), a, b in zip(plan, ours, ref):
        assert torch.equal(a, b), f"slot {s}: max abs diff {(a - b).abs().max().item():.3e} from a fresh feed"
    last = runner.feed_many([0, 1], [full[0][15:16], full[1][10:12]])  # and later feeds go on from there
    assert torch.equal(last, fresh.feed_many([0, 1], [full[0][15:16], full[1][10:12]]))


@pytest.fixture(scope="module")
def near_pair(llama_cpp, tiny_pairs, tmp_path_factory, cache_root):
    """(GGUF pair, transformers pair) of the tiny large model and, as the small one, a copy of it with a noisy
    output head (conftest.save_near_copy): its drafts are accepted about half the time."""
    large = tiny_pairs["qwen2"][1]
    root = tmp_path_factory.mktemp("near")
    near = save_near_copy(large, root / "near")
    files = [str(write_gguf(f, root / f"{name}.gguf")) for f, name in ((near, "small"), (large, "large"))]
    return ead.load_pair(*files, backend="llamacpp", cache_root=cache_root), ead.load_pair(near, large, device="cpu")


SPEC_PARAMS = ead.SamplingParams(max_new_tokens=24, ignore_eos=True)
LARGE_ONLY = RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=Role.LARGE)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("gamma, confidence, max_batch", [(1, None, 1), (4, None, 3), (8, None, 2), (4, 0.2, 4)])
def test_greedy_speculation_writes_the_large_models_text(near_pair, gamma, confidence, max_batch):
    """Rows of different lengths, more rows than slots: the text equals transformers' greedy generate of the
    large model (the same float32 weights) and the llama.cpp backend's own large-only run, token for token."""
    gguf, hf = near_pair
    prompts = [hf.encode(q[: 30 + 41 * i]) for i, q in enumerate(gsm8k_questions(4))]
    refs = []
    for ids in prompts:
        out = hf.large.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=SPEC_PARAMS.max_new_tokens, do_sample=False, pad_token_id=0,
                                      eos_token_id=None)
        refs.append(out[0, len(ids):].tolist())
    large_only = BatchEngine(gguf, LARGE_ONLY, LLAMACPP, max_batch=max_batch).generate_many(prompts, SPEC_PARAMS)
    engine = BatchEngine(gguf, RouterConfig(), LLAMACPP, max_batch=max_batch, mode="speculative",
                         speculative=SpeculativeConfig(gamma, confidence))
    results = engine.generate_many(prompts, SPEC_PARAMS)
    for i, (ref, alone, res) in enumerate(zip(refs, large_only, results)):
        assert res.token_ids == ref, f"row {i}: differs from transformers at {first_difference(ref, res.token_ids)}"
        assert alone.token_ids == ref, \
            f"row {i}: large-only differs from transformers at {first_difference(ref, alone.token_ids)}"
        assert sum(e.emitted for e in res.trace.verifications) == SPEC_PARAMS.max_new_tokens
    accepted, drafted = (sum(getattr(r.stats, k) for r in results) for k in ("accepted_tokens", "draft_tokens"))
    assert 0 < accepted < drafted, "the test needs drafts both accepted and rejected"


def test_hybrid_segments_are_each_models_own_greedy_text(near_pair):
    """Scripted segments; every token is the argmax of its writer's transformers forward over the whole prefix,
    no cache, and large segments were written by speculation."""
    gguf, hf = near_pair
    prompts = [hf.encode(q[: 40 + 30 * i]) for i, q in enumerate(gsm8k_questions(2))]
    S, L = Role.SMALL, Role.LARGE
    scripts = [[S] * 3 + [L] * 9 + [S] * 4 + [L] * 8, [L] * 7 + [S] * 7 + [L] * 10]
    engine = BatchEngine(gguf, RouterConfig(), LLAMACPP, max_batch=2, mode="hybrid", speculative=SpeculativeConfig(4))
    results = engine.generate_many(prompts, SPEC_PARAMS, [ScriptedRouter(s) for s in scripts])
    for prompt, script, res in zip(prompts, scripts, results):
        assert [s.role for s in res.trace.steps] == script
        with torch.no_grad():
            logits = {role: m(torch.tensor([prompt + res.token_ids])).logits[0]
                      for role, m in ((S, hf.small.model), (L, hf.large.model))}
        for step in res.trace.steps:
            ref = logits[step.role][len(prompt) + step.index - 1]
            assert step.token_id == int(ref.argmax()), f"token {step.index} by {step.role.value}"
        assert sum(e.emitted for e in res.trace.verifications) == script.count(L)
    assert sum(r.stats.accepted_tokens for r in results) > 0


# --- the real default pair (Q4_K_M GGUF), fetched and cached like tests/test_real_pair.py ------------------

@pytest.fixture(scope="module")
def real_pair(llama_cpp):
    return ead.load_pair(backend="llamacpp", progress=False)


@pytest.fixture(scope="module")
def natalia(real_pair):
    messages, gold = first_train_problem()
    prompt = real_pair.encode(messages)
    res = Engine(real_pair, RouterConfig(), LLAMACPP).generate(prompt, ead.SamplingParams(max_new_tokens=320))
    return prompt, res, gold


@pytest.mark.real
def test_real_pair_both_models_write_and_the_answer_is_right(natalia):
    """As tests/test_real_pair.py asserts for the hf backend, at the default tau."""
    _, res, gold = natalia
    assert_both_models_wrote_the_right_answer(res, gold)


@pytest.mark.real
def test_real_pair_every_token_is_the_active_models_choice_on_what_it_was_fed(real_pair, natalia):
    prompt, res, _ = natalia
    assert any(s.catchup_tokens > 1 for s in res.trace.switches)
    check_run(real_pair, prompt, res, median_tol=REAL_MEDIAN_TOL, top_tol=REAL_TOP_TOL)


@pytest.mark.real
def test_real_feed_many_rows_are_single_slot_runs_within_the_batching_tolerance(real_pair):
    """Q4_K_M: rows computed beside other slots differ from one-slot runs as batching does (measured up to
    0.37 logit over the vocabulary, median 0.03), never by the whole units of a mixed-up slot."""
    check_batched(real_pair.small.model, REAL_TOP_TOL, relative=False)


@pytest.mark.real
def test_real_pair_tokenizer_and_counts_match_the_hf_path(real_pair):
    hf_source = real_pair.small.source
    tok = AutoTokenizer.from_pretrained(str(Path(hf_source).parent), gguf_file=Path(hf_source).name)
    text = "What is 17*23? Think step by step.\n\n```python\nprint(17 * 23)\n```"
    assert real_pair.tokenizer(text).input_ids == tok(text).input_ids
    assert real_pair.eos_token_ids >= {tok.eos_token_id}
    assert real_pair.small.params == 630_167_424  # the README's 630M, counted by transformers


@pytest.mark.real
def test_real_pair_greedy_speculation_writes_the_large_only_text(real_pair):
    """Q4_K_M: speculation equals the llama.cpp large-only run token for token, rows of different lengths
    batched, several draft lengths. The verification pass reads 1 + gamma tokens per row where large-only reads
    one, and llama.cpp's logits depend on batching (module docstring of ead/backends/llamacpp.py): two texts may
    only part where the large model's single-pass top two are within that tolerance (a near-tie; none of
    these rows has one that flips, as measured)."""
    questions = gsm8k_questions(4)
    prompts = [real_pair.encode(q)[: 20 + 9 * i] for i, q in enumerate(questions)]  # 20 to 47 tokens
    params = ead.SamplingParams(max_new_tokens=40, ignore_eos=True)
    large_only = BatchEngine(real_pair, LARGE_ONLY, LLAMACPP, max_batch=1)
    refs = [r.token_ids for r in large_only.generate_many(prompts, params)]
    for gamma, max_batch in ((2, 4), (4, 3), (6, 2)):
        engine = BatchEngine(real_pair, RouterConfig(), LLAMACPP, max_batch=max_batch, mode="speculative",
                             speculative=SpeculativeConfig(gamma))
        results = engine.generate_many(prompts, params)
        for i, (prompt, ref, res) in enumerate(zip(prompts, refs, results)):
            first = first_difference(ref, res.token_ids)
            if first is not None:
                top = np.sort(single_pass(real_pair.large.path, prompt + ref[:first])[-1])[-2:]
                assert top[1] - top[0] < REAL_TOP_TOL, f"gamma {gamma}, row {i}: token {first} is " \
                    f"{res.token_ids[first]}, large-only wrote {ref[first]}, ahead by {top[1] - top[0]:.2f} logits"
        s = [r.stats for r in results]
        assert 0 < sum(x.accepted_tokens for x in s) < sum(x.draft_tokens for x in s)
