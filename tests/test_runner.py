"""NativeBatchRunner and backend selection, against transformers as the independent reference.

The engine with the native backend must write the same greedy tokens, with the same roles, as with the HF
backend: small only, large only, and switching both ways; and through the native engine every token must be
the active model's argmax on the full prefix, recomputed by transformers without any cache (so catch-up fed
the native caches right). On CPU every step runs eagerly; graph replay is checked in models/test_graphs.py.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GPT2Config

import ead
from ead.cli import main
from ead.config import EngineConfig, Role, RouterConfig
from ead.engine import Engine
from ead.errors import CacheCapacityError, ConfigError
from ead.runner import HFBatchRunner, ModelRunner, NativeBatchRunner, _catch_up_bucket, choose_backend
from ead.sampling import SamplingParams

from conftest import ARCHS

PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
NATIVE = EngineConfig(backend="native")
HF = EngineConfig(backend="hf")
MAX_REL_ERR = 1e-4  # float32, as in models/test_transformer.py


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_pairs):
    return ead.load_pair(*tiny_pairs[request.param], device="cpu")


def switching_cfg(pair, n: int) -> RouterConfig:
    """tau at the median entropy of a small-only HF run, so both models write (as in test_engine.py)."""
    probe = Engine(pair, RouterConfig(threshold_bits=math.inf), HF).generate(
        pair.encode(PROMPT), SamplingParams(max_new_tokens=n))
    tau = float(np.median([s.entropy_bits for s in probe.trace.steps]))
    return RouterConfig(threshold_bits=tau, window_tokens=2, min_dwell_tokens=2)


SCENARIOS = {
    "small_only": lambda pair: RouterConfig(threshold_bits=math.inf),
    "large_only": lambda pair: RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=Role.LARGE),
    "switching": lambda pair: switching_cfg(pair, 60),
}


@pytest.fixture(scope="module")
def runs(pair):
    """scenario -> (prompt ids, HF-backend result, native-backend result), greedy, 60 tokens."""
    ids = pair.encode(PROMPT)
    out = {}
    for name, make_cfg in SCENARIOS.items():
        cfg, params = make_cfg(pair), SamplingParams(max_new_tokens=60, ignore_eos=True)
        out[name] = (ids, Engine(pair, cfg, HF).generate(ids, params), Engine(pair, cfg, NATIVE).generate(ids, params))
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_native_engine_writes_the_hf_engines_tokens_and_roles(runs, scenario):
    _, hf, native = runs[scenario]
    first = next((i for i, (a, b) in enumerate(zip(hf.token_ids, native.token_ids)) if a != b), None)
    assert first is None, f"first differing token at index {first}: hf {hf.token_ids[first]}, native " \
                          f"{native.token_ids[first]}"
    assert [s.role for s in native.trace.steps] == [s.role for s in hf.trace.steps]
    diff = max(abs(a.entropy_bits - b.entropy_bits) for a, b in zip(hf.trace.steps, native.trace.steps))
    assert diff < 1e-4, f"entropy differs by up to {diff:.2e} bits"
    roles = {s.role for s in native.trace.steps}
    assert roles == {"small_only": {Role.SMALL}, "large_only": {Role.LARGE},
                     "switching": {Role.SMALL, Role.LARGE}}[scenario]


def test_native_catch_up_gives_the_active_models_choice_on_the_full_prefix(pair, runs):
    prompt, _, res = runs["switching"]
    assert res.stats.switches >= 4 and {s.to for s in res.trace.switches} == {Role.SMALL, Role.LARGE}
    assert any(s.catchup_tokens > 1 for s in res.trace.switches)
    models = {Role.SMALL: pair.small.model, Role.LARGE: pair.large.model}
    with torch.no_grad():
        logits = {role: m(torch.tensor([prompt + res.token_ids])).logits[0] for role, m in models.items()}
    for step in res.trace.steps:
        ref = logits[step.role][len(prompt) + step.index - 1]  # these logits predict the token at `index`
        assert step.token_id == int(ref.argmax()), f"token {step.index} by {step.role.value}"


def test_native_runner_logits_match_the_hf_runner_through_prefill_decode_and_catch_up(pair):
    vocab = pair.small.model.config.vocab_size
    hf, native = ModelRunner(pair.large.model, vocab), NativeBatchRunner.from_hf(pair.large.model, vocab)
    for chunk in ([5, 9, 40, 41, 7, 3, 100], [12], [13, 14, 15, 16], [2]):
        ref, [ours] = hf.feed(chunk), native.feed_many([0], [chunk])
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err < MAX_REL_ERR, f"after feeding {chunk}: max rel err {err:.2e}"
        assert native.seen[0] == hf.seen and ours.shape == (vocab,) and ours.dtype == torch.float32


@pytest.mark.parametrize("merge_tokens", [NativeBatchRunner.MERGE_TOKENS, 0])
def test_a_round_mixing_one_token_rows_and_catch_ups_gives_each_rows_hf_logits(pair, merge_tokens):
    """Rows bringing one token beside rows bringing a few run as one padded pass (within MERGE_TOKENS), or as a
    decode and a catch-up (0): either way each row gets the logits the HF model gives its whole text."""
    vocab = pair.small.model.config.vocab_size
    native = NativeBatchRunner.from_hf(pair.large.model, vocab, max_batch=4)
    native.MERGE_TOKENS = merge_tokens
    texts = [[5, 9, 40], [12, 13], [7, 3, 100, 4, 8], [2]]
    native.feed_many([0, 1, 2, 3], texts)
    decode, decodes = native._decode, []
    native._decode = lambda *args: decodes.append(args) or decode(*args)
    # The one-token rows add (4 - 2) x 4 and (4 - 1) x 4 padded tokens to the catch-ups: merged unless the limit is 0.
    rounds = ([[6], [14, 15, 16], [9], [30, 31]], [[17], [2], [11, 12, 13], [8]])
    for new in rounds:
        ours = native.feed_many([0, 1, 2, 3], new)
        texts = [t + n for t, n in zip(texts, new)]
        with torch.no_grad():
            for text, row in zip(texts, ours):
                ref = pair.large.model(torch.tensor([text])).logits[0, -1].float()
                err = ((row - ref).abs().max() / ref.abs().max()).item()
                assert err < MAX_REL_ERR, f"after {text}: max rel err {err:.2e}"
    assert native.seen == [len(t) for t in texts]
    assert len(decodes) == (0 if merge_tokens else 2)


def test_native_runner_refuses_overflow_before_touching_the_cache(tiny_pairs):
    model = ead.load_pair(*tiny_pairs["llama"], device="cpu").small.model
    runner = NativeBatchRunner.from_hf(model, model.config.vocab_size, max_seq_tokens=8)
    assert runner.cache.max_seq_tokens == 8 and not runner.use_graphs  # no graphs on CPU
    runner.feed_many([0], [[1, 2, 3, 4, 5, 6]])
    with pytest.raises(CacheCapacityError, match=r"needs 9 tokens.*max_seq_tokens=8"):
        runner.feed_many([0], [[7, 8, 9]])
    assert runner.seen == [6] and runner.cache.lengths.tolist() == [6]
    runner.feed_many([0], [[7, 8]])  # the refused call changed nothing, so the last two slots are still free
    runner.reset(0)
    assert runner.seen == [0] and runner.cache.lengths.tolist() == [0]


@pytest.mark.parametrize("max_batch, rows", [(1, [1]), (4, [1, 2, 4]), (64, [1, 2, 4, 8, 16, 32, 64])])
def test_verification_graph_buckets_cover_one_token_and_a_draft_per_row(tiny_pairs, max_batch, rows):
    """The (rows, width) buckets a verification pass replays as a CUDA graph (the graphs themselves are checked
    in models/test_graphs.py): every row count up to max_batch at widths 2, 4, 8 and 16 (one token and a draft
    of up to 15), except where the padded pass outgrows the 512 rows of logits the graphs' shared buffer holds."""
    model = ead.load_pair(*tiny_pairs["qwen2"], device="cpu").small.model
    runner = NativeBatchRunner.from_hf(model, 10, max_seq_tokens=64, max_batch=max_batch)
    expected = {(n, w) for n in rows for w in (2, 4, 8, 16)} - {(64, 16)}
    assert runner._verify_buckets() == expected
    assert runner._verify_buckets() <= runner._catch_up_buckets()
    for n in range(1, max_batch + 1):  # the bucket each pass pads to
        for gamma in range(1, 16):
            bucket = _catch_up_bucket(n, 1 + gamma)
            assert bucket in expected or bucket == (64, 16), f"{n} rows, gamma {gamma}: bucket {bucket}"
        assert _catch_up_bucket(n, 17) not in expected  # a wider pass (a prompt) runs eagerly


def test_native_default_context_is_the_models_capped_at_4096(tiny_pairs):
    model = ead.load_pair(*tiny_pairs["qwen2"], device="cpu").small.model
    assert NativeBatchRunner.from_hf(model, 10).max_seq_tokens == 256  # the tiny models' max_position_embeddings
    with pytest.raises(ConfigError, match=r"max_seq_tokens=300 exceeds.*max_position_embeddings=256"):
        NativeBatchRunner.from_hf(model, 10, max_seq_tokens=300)


@pytest.mark.parametrize("engine_cfg", [NATIVE, HF], ids=["native", "hf"])
def test_max_seq_tokens_caps_the_context_of_either_backend(tiny_pairs, engine_cfg):
    pair = ead.load_pair(*tiny_pairs["qwen2"], device="cpu")
    cfg = EngineConfig(backend=engine_cfg.backend, max_seq_tokens=30)
    engine = Engine(pair, RouterConfig(threshold_bits=0.5, window_tokens=2, min_dwell_tokens=2), cfg)
    ids = pair.encode(PROMPT)[:20]
    res = engine.generate(ids, SamplingParams(max_new_tokens=100, ignore_eos=True))
    assert engine.max_seq_tokens == 30 and res.finish_reason == "length" and len(ids) + len(res.token_ids) == 30


def test_default_engine_on_cpu_keeps_transformers(tiny_pairs):
    engine = Engine(ead.load_pair(*tiny_pairs["qwen3"], device="cpu"))
    assert engine.backend == "hf" and all(isinstance(r, HFBatchRunner) for r in engine.runners.values())


def test_auto_backend_picks_native_on_cuda_and_warns_on_an_unsupported_family():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    qwen = SimpleNamespace(config=SimpleNamespace(model_type="qwen2", hidden_act="silu", hidden_size=64,
                                                  num_hidden_layers=1, num_attention_heads=4, vocab_size=10,
                                                  intermediate_size=8, rms_norm_eps=1e-6, rope_theta=1e4,
                                                  tie_word_embeddings=False, max_position_embeddings=64))
    gpt2 = SimpleNamespace(config=GPT2Config())
    assert choose_backend([qwen, qwen], "auto", cuda) == "native"
    assert choose_backend([qwen, qwen], "auto", cpu) == "hf"
    assert choose_backend([qwen, qwen], "hf", cuda) == "hf" and choose_backend([qwen], "native", cpu) == "native"
    with pytest.warns(UserWarning, match=r"falls back to 'hf'.*model_type 'gpt2'"):
        assert choose_backend([qwen, gpt2], "auto", cuda) == "hf"


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="tpu"), "backend must be one of auto, hf, native, llamacpp, got 'tpu'"),
    (dict(cuda_graphs="yes"), "cuda_graphs must be True or False"),
    (dict(max_seq_tokens=1), "max_seq_tokens must be an integer >= 2"),
    (dict(max_seq_tokens=100.0), "max_seq_tokens must be an integer"),
])
def test_invalid_engine_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_cli_backend_flag(capsys, tiny_pairs):
    small, large = tiny_pairs["mistral"]
    argv = ["generate", "--small", small, "--large", large, "--device", "cpu", "--raw", "--max-new-tokens", "6"]
    assert main(argv + ["--backend", "native", "Natalia sold clips"]) == 0
    assert "tokens, large share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--backend", "vllm", "Hi"])
    assert "invalid choice: 'vllm'" in capsys.readouterr().err


def test_an_eager_catch_up_of_rows_far_apart_in_length_is_split_by_length(pair):
    """Rows bringing 40, 3, 2 and 1 tokens with a pass worth 16 padded tokens (MERGE_TOKENS): one pass would pad
    4 x 40 = 160 tokens, a pass of the long row and one of the rest 40 + max(16, 3 x 3) = 56, so two passes run,
    of widths 40 and 3; each row still gets the logits the HF model gives its whole text, in the order asked."""
    vocab = pair.small.model.config.vocab_size
    native = NativeBatchRunner.from_hf(pair.large.model, vocab, max_batch=4)
    native.MERGE_TOKENS = 16
    assert native._split([3, 40, 1, 2]) == [[1], [0, 3, 2]]  # by hand: indices, longest first
    assert native._split([5, 5, 5]) == [[0, 1, 2]] and native._split([10, 9]) == [[0, 1]]  # 20 < 16 + 16
    assert native._split([30, 29]) == [[0], [1]]  # 30 + 29 < 2 x 30
    catch_up, widths = native._catch_up, []
    native._catch_up = lambda slots, ids, *args, **kw: widths.append(max(map(len, ids))) or catch_up(
        slots, ids, *args, **kw)
    gen = torch.Generator().manual_seed(3)
    texts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 40, 2, 1)]
    ours = native.feed_many([0, 1, 2, 3], texts)
    assert sorted(widths) == [3, 40]
    with torch.no_grad():
        for text, row in zip(texts, ours):
            ref = pair.large.model(torch.tensor([text])).logits[0, -1].float()
            err = ((row - ref).abs().max() / ref.abs().max()).item()
            assert err < MAX_REL_ERR, f"row of {len(text)} tokens: max rel err {err:.2e}"
    assert native.seen == [3, 40, 2, 1]



def test_a_catch_up_too_wide_for_one_graph_runs_in_chunks_each_row_getting_its_hf_logits(pair):
    """Graphs of at most 8 tokens and 4 a row (MAX_GRAPH_TOKENS, MAX_GRAPH_WIDTH). By hand, with a pass worth 4
    padded tokens (MERGE_TOKENS) and an eager pass at least 32 (EAGER_TOKENS, its launches):
    - rows of 10, 7 and 3 tokens: `_split` passes them one by one (10 + 7 + 4 = 21 padded tokens against 3 x 10
      together); alone, the row of 10 costs 32 eagerly, or 3 chunks of 4, 4 and 2 tokens at 4 each: chunks.
    - three rows of 6: one group (18, no less than 2 x 6 + 6); eagerly 32; chunked whole (3 rows pad to 4, so 2
      tokens a pass: 3 passes of 4 x 2) 24; cut into 2 rows and 1, 4 tokens a pass: 8 + 4, then 4 + 4, 20.
    - a row of 20 would take 5 passes of 4, over MAX_CHUNK_PASSES: eager.
    Then a catch-up run in chunks: with a pass worth 16 and an eager pass at least 96, rows of 8, 7, 6 and 5 stay
    one group and run as 4 passes of 2 tokens a row (4 x 16 = 64 < 96), the last of rows 8 and 7 alone. Each row
    gets the logits the HF model gives its whole text, from the pass that fed its last token."""
    vocab = pair.small.model.config.vocab_size
    native = NativeBatchRunner.from_hf(pair.large.model, vocab, max_batch=4)
    native.MAX_GRAPH_TOKENS, native.MAX_GRAPH_WIDTH, native.MAX_CHUNK_PASSES = 8, 4, 4
    native.MERGE_TOKENS, native.EAGER_TOKENS, native.chunk_eager = 4, 32, True
    assert native._plan([10, 7, 3]) == [[[(0, 0, 4)], [(0, 4, 8)], [(0, 8, 10)]], [[(1, 0, 4)], [(1, 4, 7)]],
                                        [[(2, 0, 3)]]]
    assert native._plan([6, 6, 6]) == [[[(0, 0, 4), (1, 0, 4)], [(0, 4, 6), (1, 4, 6)], [(2, 0, 4)], [(2, 4, 6)]]]
    assert native._plan([20]) == [[[(0, 0, 20)]]]
    native.chunk_eager = False  # without graphs, chunks would only add passes
    assert native._plan([10, 7, 3]) == [[[(0, 0, 10)]], [[(1, 0, 7)]], [[(2, 0, 3)]]]

    native.MERGE_TOKENS, native.EAGER_TOKENS, native.chunk_eager = 16, 96, True
    catch_up, passes = native._catch_up, []
    native._catch_up = lambda slots, ids, *args, **kw: passes.append([len(t) for t in ids]) or catch_up(
        slots, ids, *args, **kw)
    gen = torch.Generator().manual_seed(4)
    prefix = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 1, 2, 5)]
    native.feed_many([0, 1, 2, 3], prefix)
    passes.clear()
    new = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 8, 5, 7)]
    ours = native.feed_many([0, 1, 2, 3], new)
    assert passes == [[2, 2, 2, 2], [2, 2, 2, 2], [2, 2, 2, 1], [2, 1]]  # longest first: rows of 8, 7, 6, 5
    with torch.no_grad():
        for text, row in zip([p + n for p, n in zip(prefix, new)], ours):
            ref = pair.large.model(torch.tensor([text])).logits[0, -1].float()
            err = ((row - ref).abs().max() / ref.abs().max()).item()
            assert err < MAX_REL_ERR, f"row of {len(text)} tokens: max rel err {err:.2e}"
    assert native.seen == [9, 9, 7, 12]
