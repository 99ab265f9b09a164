"""Tests for ead/launch.py and --large-tp: a pair whose large model is split over 2 CPU processes (gloo), started
by ead itself (the API and `ead generate --large-tp 2`) or by torchrun, against the same pair in one process.

The reference is the unsplit pair on the native backend in this process; the split one must write the same tokens
with the same roles, and rank 0's samplers decide for every rank (each rank gets its own seeds here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ead
from ead import launch
from ead.cli import main
from ead.config import EngineConfig, RouterConfig
from ead.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting."]
ROUTER = RouterConfig(threshold_bits=1.0, window_tokens=2, min_dwell_tokens=2)  # both models write (checked)
NEW_TOKENS = 24

pytestmark = pytest.mark.usefixtures("one_thread")


def sampling(rank: int) -> list[ead.SamplingParams]:
    return [ead.SamplingParams(temperature=0.9, seed=100 * rank + i, max_new_tokens=NEW_TOKENS)
            for i in range(len(PROMPTS))]


def outputs(results: list[ead.GenerateResult]) -> list[tuple[list[int], list[str]]]:
    return [(r.token_ids, [s.role.value for s in r.trace.steps]) for r in results]


def generate_split(folders: tuple[str, str], out: str) -> int:
    """One rank: load the pair with its large model split, generate greedy and sampled, save what rank 0 decided."""
    torch.set_num_threads(1)
    rank = torch.distributed.get_rank()
    pair = ead.load_pair(*folders, device="cpu", large_tp=2)
    assert pair.large_tp == 2 and pair.large.model.args.n_heads == 2, "each rank holds half the large model's heads"
    greedy = ead.generate(pair, PROMPTS, ROUTER, ead.SamplingParams(max_new_tokens=NEW_TOKENS))
    sampled = ead.generate(pair, PROMPTS, ROUTER, sampling(rank))
    torch.save({"greedy": outputs(greedy), "sampled": outputs(sampled)}, Path(out) / f"rank{rank}.pt")
    return 0


def test_split_pair_through_the_api_equals_one_process(tiny_pairs, tmp_path):
    folders = tiny_pairs["qwen2"]
    pair = ead.load_pair(*folders, device="cpu")
    native = EngineConfig(backend="native")
    expected = {"greedy": outputs(ead.generate(pair, PROMPTS, ROUTER, ead.SamplingParams(max_new_tokens=NEW_TOKENS),
                                               native)),
                "sampled": outputs(ead.generate(pair, PROMPTS, ROUTER, sampling(rank=0), native))}
    roles = {role for _, rs in expected["greedy"] for role in rs}
    assert roles == {"small", "large"}, f"the test needs both models to write, got {roles}"
    assert launch.spawn(generate_split, 2, (folders, str(tmp_path)), "cpu") == 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for case, ref in expected.items():
            for b, ((ids, roles), (ref_ids, ref_roles)) in enumerate(zip(got[case], ref)):
                first = next((i for i, (x, y) in enumerate(zip(ids, ref_ids)) if x != y), None)
                assert ids == ref_ids, f"{case} row {b} rank {rank}: first differing token at {first}"
                assert roles == ref_roles, f"{case} row {b} rank {rank}: the router chose differently"


def cli_args(folders: tuple[str, str]) -> list[str]:
    return ["generate", "--small", folders[0], "--large", folders[1], "--device", "cpu", "--raw", "--json",
            "--tau", str(ROUTER.threshold_bits), "--window", str(ROUTER.window_tokens), "--d-min",
            str(ROUTER.min_dwell_tokens), "--max-new-tokens", str(NEW_TOKENS), PROMPTS[0]]


def expected_cli_output(folders: tuple[str, str]) -> ead.GenerateResult:
    pair = ead.load_pair(*folders, device="cpu")
    return ead.Engine(pair, ROUTER, EngineConfig(backend="native")).generate(
        pair.encode(PROMPTS[0]), ead.SamplingParams(max_new_tokens=NEW_TOKENS))


def run_cli(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)


@pytest.mark.parametrize("how", ["--large-tp", "torchrun"])
def test_generate_split_over_two_processes_equals_one_process(tiny_pairs, how):
    folders = tiny_pairs["llama"]
    expected = expected_cli_output(folders)
    assert {s.role for s in expected.trace.steps} == set(ead.Role), "the test needs both models to write"
    if how == "--large-tp":
        proc = run_cli([sys.executable, "-m", "ead.cli", *cli_args(folders), "--large-tp", "2"])
    else:
        proc = run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(launch.free_port()), "-m", "ead.cli", *cli_args(folders)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
    assert got["token_ids"] == expected.token_ids
    assert [s["role"] for s in got["trace"]["steps"]] == [s.role.value for s in expected.trace.steps]
    assert proc.stderr.count("loaded ") == 1, "only rank 0 speaks"


@pytest.mark.parametrize("extra, message", [
    (["--large-tp", "3"], "n_heads=4, n_kv_heads=2, intermediate_size=128, not divisible by 3"),
    (["--large-tp", "2", "--backend", "hf"], "--backend hf cannot be split"),
    (["--large-tp", "2", "--mode", "speculative"], "supports --mode ead only"),
    (["--large-tp", "0"], "--large-tp must be an integer >= 1"),
])
def test_bad_large_tp_is_a_config_error_before_any_process_starts(tiny_pairs, capsys, extra, message):
    assert main([*cli_args(tiny_pairs["qwen2"]), *extra]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and message in err, err


def test_torchrun_size_must_match_large_tp(tiny_pairs, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*cli_args(tiny_pairs["qwen2"]), "--large-tp", "4"]) == 2
    assert "torchrun started 2 processes but --large-tp is 4" in capsys.readouterr().err


def test_more_ranks_than_gpus_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="needs 4 GPUs, one per rank, but this machine has 2"):
        launch.check_world(4, "cuda")
    launch.check_world(4, "cpu")  # gloo ranks share the CPU


def test_a_split_pair_needs_a_group_of_its_size(tiny_pairs):
    with pytest.raises(ConfigError, match="large_tp=2 needs this process to be one of 2 ranks, but it has no process"):
        ead.load_pair(*tiny_pairs["qwen2"], device="cpu", large_tp=2)


def test_torchrun_environment_is_read():
    assert launch.TorchrunRank.from_environ({}) is None
    assert launch.TorchrunRank.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == \
        launch.TorchrunRank(rank=1, world=2, local_rank=1)
    with pytest.raises(ConfigError, match="must be integers"):
        launch.TorchrunRank.from_environ({"RANK": "one", "WORLD_SIZE": "2"})
