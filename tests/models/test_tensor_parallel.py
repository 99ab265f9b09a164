"""Tests for ead/models/tensor_parallel.py: a model split over 2 CPU processes (gloo) against the same model whole.

One spawn of two ranks runs every case for every architecture and saves each rank's results; the tests compare
them with the unsharded decoder in this process (itself checked against transformers in test_transformer.py),
and greedy tokens with a cache-free reference that re-reads the whole sequence each step.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ead.errors import ConfigError
from ead.models.kv_cache import KVCache
from ead.models.tensor_parallel import (
    RankDivergenceError,
    broadcast_from_first,
    check_ranks_agree,
    generate,
    init_rank,
    rank_args,
    shard,
)
from ead.models.transformer import ModelArgs, Transformer

from conftest import assert_close

WORLD = 2
PAD_ID = 7
NEW_TOKENS = 20
PROMPTS = [[5, 17, 42, 99, 3, 250], [8, 1, 77]]
RAGGED = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38], [27, 18, 28]]
RAGGED_NEXT = [[11], [12, 13, 14, 15], []]

pytestmark = pytest.mark.usefixtures("one_thread")


def arch_args() -> dict[str, ModelArgs]:
    """Tiny shapes read from transformers configs, one per supported architecture; an odd vocabulary (llama)
    exercises the padded LM-head split, 8 q and 4 kv heads (mistral) two q heads per kv head on each rank."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    tiny = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128}
    configs = {
        "llama": LlamaConfig(**{**tiny, "vocab_size": 261}),
        "qwen2": Qwen2Config(**tiny),  # q/k/v biases
        "qwen3": Qwen3Config(**tiny, head_dim=32, tie_word_embeddings=True),  # q/k norms, head_dim != 64/4
        "mistral": MistralConfig(**{**tiny, "num_attention_heads": 8, "num_key_value_heads": 4}, sliding_window=None),
    }
    return {name: ModelArgs.from_hf_config(cfg) for name, cfg in configs.items()}


def build(args: ModelArgs, seed: int) -> Transformer:
    """Random weights, the same in every process for one seed; norms and biases away from 1 and 0, where a
    dropped or misplaced one would not show."""
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
    return model


@torch.no_grad()
def feed(model: Transformer, cache: KVCache, chunks: list[list[int]], last_only: bool = True) -> Tensor:
    """One forward in which row b gets chunks[b] (maybe empty), right-padded with PAD_ID."""
    B, T = len(chunks), max(1, max(len(c) for c in chunks))
    tokens = torch.tensor([c + [PAD_ID] * (T - len(c)) for c in chunks], dtype=torch.int64)
    valid = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
    return model(tokens, cache.next_positions(B, T), cache, valid, last_only=last_only)


def run_cases(model: Transformer) -> dict[str, Tensor]:
    """Prefill (every position), a one-token decode, a ragged batch with an idle row and its next round."""
    def new_cache(rows: int) -> KVCache:
        return KVCache.for_model(model.args, rows, 32, torch.float32, "cpu")

    cache = new_cache(1)
    prefill = feed(model, cache, [PROMPTS[0]], last_only=False)  # (1, T, V)
    decode = feed(model, cache, [[int(prefill[0, -1].argmax())]])  # (1, V)
    cache = new_cache(4)
    ragged = feed(model, cache, RAGGED + [[]], last_only=False)  # (4, 9, V)
    ragged_next = feed(model, cache, RAGGED_NEXT)  # (3, V), row 2 idle
    return {"prefill": prefill[0], "decode": decode[0], "ragged_next": ragged_next[:2],
            **{f"ragged row {b}": ragged[b, : len(seq)] for b, seq in enumerate(RAGGED)},
            "kv_heads": torch.tensor(cache.k.shape[2])}


def run_rank(rank: int, world: int, port: int, args: dict[str, ModelArgs], out: str) -> None:
    """One process of the spawned group: every case for every architecture, results saved to out/rank{rank}.pt."""
    torch.set_num_threads(1)
    init_rank(rank, world, port, backend="gloo")
    results = {}
    for i, (name, a) in enumerate(args.items()):
        sharded = shard(build(a, seed=i), rank, world)
        results[name] = run_cases(sharded)
        results[name]["greedy"] = torch.tensor(generate(sharded, PROMPTS, NEW_TOKENS, lambda x: x.argmax(-1),
                                                        check_every_steps=4))
    try:  # rank 1 pretends to have sampled another token
        check_ranks_agree([[1, 2, rank]], "cpu")
        results["divergence"] = "not raised"
    except RankDivergenceError as e:
        results["divergence"] = str(e)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict[str, ModelArgs], list[dict]]:
    """(args by architecture, each rank's results) from one spawn of WORLD gloo processes."""
    args, out = arch_args(), tmp_path_factory.mktemp("tp")
    mp.spawn(run_rank, args=(WORLD, free_port(), args, str(out)), nprocs=WORLD, join=True)
    return args, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@torch.no_grad()
def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a fresh full forward over the whole sequence."""
    seq = list(prompt)
    for _ in range(n):
        cache = KVCache.for_model(model.args, 1, len(seq), torch.float32, "cpu")
        seq.append(int(feed(model, cache, [seq])[0].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_sharded_logits_equal_whole_model(ranks, arch):
    args, results = ranks
    whole = build(args[arch], seed=list(args).index(arch))
    expected = run_cases(whole)
    for rank, result in enumerate(results):
        got = result[arch]
        for case, ref in expected.items():
            if case != "kv_heads":
                assert_close(got[case], ref, f"{arch} {case} on rank {rank}")
        assert int(got["kv_heads"]) == args[arch].n_kv_heads // WORLD, "each rank caches only its kv heads"
    for case in expected:  # an all-reduce and an all-gather leave the same bits on every rank
        assert torch.equal(results[0][arch][case], results[1][arch][case]), f"{arch} {case}: ranks differ"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_sharded_greedy_equals_whole_model(ranks, arch):
    args, results = ranks
    whole = build(args[arch], seed=list(args).index(arch))
    for b, prompt in enumerate(PROMPTS):
        expected = greedy_without_cache(whole, prompt, NEW_TOKENS)
        for rank, result in enumerate(results):
            got = result[arch]["greedy"][b].tolist()
            first = next((i for i, (x, y) in enumerate(zip(got, expected)) if x != y), None)
            assert first is None, f"{arch} row {b} rank {rank}: first differing token at step {first}: {got} vs {expected}"


def test_diverging_ranks_raise_on_every_rank(ranks):
    _, results = ranks
    for result in results:
        assert "different token ids" in result["divergence"], result["divergence"]


@pytest.mark.parametrize("heads, kv_heads, ffn, world, named", [
    (4, 2, 128, 3, "n_heads=4, n_kv_heads=2, intermediate_size=128, not divisible by 3"),
    (4, 2, 128, 4, "n_kv_heads=2, not divisible by 4"),
    (8, 8, 90, 4, "intermediate_size=90, not divisible by 4"),
])
def test_indivisible_shapes_are_config_errors(heads, kv_heads, ffn, world, named):
    args = ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=heads, n_kv_heads=kv_heads, head_dim=8,
                     intermediate_size=ffn)
    with pytest.raises(ConfigError, match=named):
        rank_args(args, world)
    with torch.device("meta"):
        model = Transformer(args)
    with pytest.raises(ConfigError, match=named):
        shard(model, 0, world)


def test_bad_rank_or_world_are_config_errors():
    model = build(arch_args()["llama"], seed=0)
    with pytest.raises(ConfigError, match=r"rank 2 is outside 0\.\.1"):
        shard(model, 2, 2)
    with pytest.raises(ConfigError, match=r"integer >= 1, got 0"):
        shard(model, 0, 0)


def test_one_rank_is_the_whole_model_and_shares_replicated_weights():
    args = arch_args()["qwen3"]
    whole = build(args, seed=2)
    one = shard(whole, 0, 1)
    assert one.tok_embeddings.weight.data_ptr() == whole.tok_embeddings.weight.data_ptr(), "copied, not shared"
    assert one.output.weight.data_ptr() == whole.output.weight.data_ptr(), "a tied head's rows must stay shared"
    expected, got = run_cases(whole), run_cases(one)
    for case, ref in expected.items():
        assert torch.equal(got[case], ref), f"world 1 {case}"


EAD_ARCHS = ["qwen2", "qwen3"]  # the large model's q/k/v biases and its q/k norms cross the split
EAD_PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting."]


def ead_engine(folders: tuple[str, str], tau: float, rank: int | None = None, world: int = 1, sync=None):
    """A native-backend BatchEngine of two rows; with `rank`, its large runner runs `shard(large, rank, world)`.
    (What `load_pair(..., large_tp=2)` does, tested in tests/test_launch.py; here by swapping the runner, with the
    sync passed by hand.)"""
    import ead
    from ead.config import EngineConfig, Role, RouterConfig
    from ead.engine import BatchEngine
    from ead.runner import NativeBatchRunner

    pair = ead.load_pair(*folders, device="cpu")
    cfg = RouterConfig(threshold_bits=tau, window_tokens=2, min_dwell_tokens=2)
    engine = BatchEngine(pair, cfg, EngineConfig(backend="native", cuda_graphs=False), max_batch=2, sync=sync)
    if rank is not None:
        large = engine.runners[Role.LARGE]
        engine.runners[Role.LARGE] = NativeBatchRunner(shard(large.model, rank, world), large.vocab_size,
                                                       large.max_seq_tokens, cuda_graphs=False, max_batch=2)
    return pair, engine


def run_ead_rank(rank: int, world: int, port: int, runs: dict[str, tuple[tuple[str, str], float]], out: str) -> None:
    """Every rank runs the same engine on the same prompts; only the large model is split."""
    from ead.sampling import SamplingParams

    torch.set_num_threads(1)
    init_rank(rank, world, port, backend="gloo")
    results = {}
    for arch, (folders, tau) in runs.items():
        pair, engine = ead_engine(folders, tau, rank, world)
        outs = engine.generate_many([pair.encode(p) for p in EAD_PROMPTS], SamplingParams(max_new_tokens=30))
        results[arch] = [(r.token_ids, [s.role.value for s in r.trace.steps]) for r in outs]
        check_ranks_agree([r.token_ids for r in outs], "cpu")
        # Sampled, with a different seed on each rank: the engine's sync makes rank 0's draws everyone's.
        pair, engine = ead_engine(folders, tau, rank, world, sync=broadcast_from_first)
        outs = engine.generate_many([pair.encode(p) for p in EAD_PROMPTS], sampled(seed=rank))
        results[arch + "-sampled"] = [(r.token_ids, [s.role.value for s in r.trace.steps]) for r in outs]
        check_ranks_agree([r.token_ids for r in outs], "cpu")
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def sampled(seed: int):
    from ead.sampling import SamplingParams

    return [SamplingParams(temperature=0.9, seed=seed + i, max_new_tokens=30) for i in range(len(EAD_PROMPTS))]


def test_ead_with_a_sharded_large_model_equals_unsharded(tiny_pairs, tmp_path):
    import numpy as np

    import ead
    from ead.config import RouterConfig
    from ead.engine import Engine
    from ead.sampling import SamplingParams

    expected, runs = {}, {}
    for arch in EAD_ARCHS:
        # tau at the median entropy of a small-only run, so that both models write.
        pair = ead.load_pair(*tiny_pairs[arch], device="cpu")
        probe = Engine(pair, RouterConfig(threshold_bits=float("inf"))).generate(
            pair.encode(EAD_PROMPTS[0]), SamplingParams(max_new_tokens=30))
        tau = float(np.median([s.entropy_bits for s in probe.trace.steps]))
        pair, engine = ead_engine(tiny_pairs[arch], tau)
        outs = engine.generate_many([pair.encode(p) for p in EAD_PROMPTS], SamplingParams(max_new_tokens=30))
        expected[arch] = [(r.token_ids, [s.role.value for s in r.trace.steps]) for r in outs]
        assert any(r.stats.tokens_large > 0 for r in outs) and any(r.stats.tokens_small > 0 for r in outs)
        pair, engine = ead_engine(tiny_pairs[arch], tau)
        outs = engine.generate_many([pair.encode(p) for p in EAD_PROMPTS], sampled(seed=0))  # rank 0's seeds
        expected[arch + "-sampled"] = [(r.token_ids, [s.role.value for s in r.trace.steps]) for r in outs]
        other = ead_engine(tiny_pairs[arch], tau)[1].generate_many([pair.encode(p) for p in EAD_PROMPTS], sampled(1))
        assert [r.token_ids for r in other] != [r.token_ids for r in outs]  # rank 1's own seeds would diverge
        runs[arch] = (tiny_pairs[arch], tau)
    mp.spawn(run_ead_rank, args=(WORLD, free_port(), runs, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for arch in [a + suffix for a in EAD_ARCHS for suffix in ("", "-sampled")]:
            for b, ((ids, roles), (ref_ids, ref_roles)) in enumerate(zip(got[arch], expected[arch])):
                first = next((i for i, (x, y) in enumerate(zip(ids, ref_ids)) if x != y), None)
                assert ids == ref_ids, f"{arch} row {b} rank {rank}: first differing token at {first}"
                assert roles == ref_roles, f"{arch} row {b} rank {rank}: the router chose differently"
