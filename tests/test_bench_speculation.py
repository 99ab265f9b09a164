"""`ead bench`'s speculation rows (ead/bench_speculation.py) end to end on the CPU, and benchmarks/
speculative_speed.py, on a tiny pair whose small model is the large one with a noisy head (drafts accepted
about half the time). The references are independent: the verification events each run's trace holds, counted
here, and the large-only text the speculative rows must reproduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ead
from ead.bench_speculation import SpeculationMode, compare_outputs, run_mode
from ead.cli import main
from ead.config import EngineConfig, RouterConfig, SpeculativeConfig
from ead.engine import BatchEngine
from ead.sampling import SamplingParams

from conftest import save_near_copy

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def near(tiny_pairs, tmp_path_factory) -> tuple[str, str]:
    large = tiny_pairs["qwen2"][1]
    return save_near_copy(large, tmp_path_factory.mktemp("bench") / "near"), large


def test_bench_adds_speculation_rows_for_real_models(near, capsys):
    small, large = near
    argv = ["bench", "--small", small, "--large", large, "--device", "cpu", "--backend", "hf", "--batch", "1,2",
            "--tokens", "12", "--prompt-tokens", "8", "--shares", "0.3", "--problems", "3", "--gamma", "3"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    rows = [r for r in map(json.loads, out.splitlines()) if r["config"] == "speculation"]
    assert not [r for r in rows if "error" in r]
    modes = ["large_only", "speculative_g3", "speculative_g3_c0.5", "ead_f0.3", "hybrid_f0.3_g3"]
    anchors = ["transformers generate (large)", "transformers assisted generation"]  # batch 1 only
    assert [(r["batch"], r["mode"]) for r in rows] == [(1, m) for m in modes + anchors] + [(2, m) for m in modes]
    by = {(r["batch"], r["mode"]): r for r in rows}
    for batch in (1, 2):
        assert all(by[batch, m]["tokens"] == 3 * 12 for m in ("large_only", "speculative_g3", "hybrid_f0.3_g3"))
        for m in ("speculative_g3", "speculative_g3_c0.5"):
            r = by[batch, m]
            assert r["rows_same_as_large_only"] == "3/3" and r["large_share"] == 1.0
            assert 0 < r["acceptance_rate"] < 1 and r["verify_passes"] > 0
            assert r["tokens_per_large_pass"] == pytest.approx(3 * 12 / r["verify_passes"])
        # the adaptive length drafts fewer tokens per pass than gamma 3 every time
        assert by[batch, "speculative_g3_c0.5"]["draft_tokens"] / by[batch, "speculative_g3_c0.5"]["verify_passes"] \
            < by[batch, "speculative_g3"]["draft_tokens"] / by[batch, "speculative_g3"]["verify_passes"]
        ead_row, hybrid = by[batch, "ead_f0.3"], by[batch, "hybrid_f0.3_g3"]
        assert hybrid["large_share"] == ead_row["large_share"] > 0  # the same scripted roles
        assert ead_row["verify_passes"] == 0 and hybrid["verify_passes"] > 0
        assert by[batch, "large_only"]["vs_large_only"] == 1.0
    assert "| speculative_g3 |" in err and "| transformers assisted generation |" in err


def test_run_mode_counts_what_the_traces_hold(near):
    """The row's totals against the verification events of a separate run of the same engine settings."""
    pair = ead.load_pair(*near, device="cpu")
    prompts = [pair.encode(q) for q in ("Tom has three apples", "A train leaves the station at noon and")]
    spec = SpeculativeConfig(4)
    row, outputs = run_mode(pair, prompts, 10, SpeculationMode("s", "speculative", speculative=spec),
                            EngineConfig(backend="hf"), max_batch=2)
    results = BatchEngine(pair, RouterConfig(), EngineConfig(backend="hf"), max_batch=2, mode="speculative",
                          speculative=spec).generate_many(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    events = [e for r in results for e in r.trace.verifications]
    assert outputs == [r.token_ids for r in results]
    assert row["verify_passes"] == len(events) and row["tokens"] == 20
    assert row["draft_tokens"] == sum(e.drafted for e in events)
    assert row["acceptance_rate"] == sum(e.accepted for e in events) / sum(e.drafted for e in events)
    assert row["accepted_per_pass"] == sum(e.accepted for e in events) / len(events)


def test_compare_outputs_gives_the_large_models_logit_gap_where_rows_part(near):
    """The gap against transformers' forward of the common prefix, no cache."""
    pair = ead.load_pair(*near, device="cpu")
    prompts = [pair.encode("Tom has three apples"), pair.encode("A train leaves the station")]
    reference, outputs = [[5, 6, 7, 8], [9, 10, 11, 12]], [[5, 6, 7, 8], [9, 10, 40, 12]]
    row = {}
    compare_outputs(row, outputs, reference, pair, prompts, EngineConfig(backend="hf"))
    with torch.no_grad():
        logits = pair.large.model(torch.tensor([prompts[1] + [9, 10]])).logits[0, -1]
    assert row["rows_same_as_large_only"] == "1/2" and row["first_difference_at_token"] == 2
    assert row["logit_gaps_at_differences"] == [pytest.approx(float(logits[11] - logits[40]), abs=2e-3)]


def test_random_weights_get_no_speculation_rows(capsys):
    argv = ["bench", "--pair", "tiny:tiny-large", "--device", "cpu", "--batch", "1", "--tokens", "8",
            "--prompt-tokens", "4", "--shares", "", "--hf-tokens", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    [note] = [r for r in rows if r["config"] == "speculation"]
    assert "random weights" in note["skipped"] and "mode" not in note
    assert "Speculation rows skipped for tiny -> tiny-large: random weights" in err


def test_speculative_speed_script_runs(near):
    small, large = near
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/speculative_speed.py", "--small", small, "--large", large,
                           "--problems", "2", "--tokens", "8", "--taus", "0.5,1", "--batch", "2"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["mode"] for r in rows] == ["large only", "small only", "EAD tau=0.5", "EAD tau=1", "speculative gamma=4",
                                         "hybrid tau=0.5 gamma=4", "hybrid tau=1 gamma=4",
                                         "transformers generate (large)", "transformers assisted generation"]
    assert rows[4]["rows_same_as_large_only"] == "2/2" and rows[4]["acceptance_rate"] > 0
    assert "| speculative gamma=4 |" in proc.stderr
