"""benchmarks/multi_gpu.py end to end on the CPU: every measurement at tiny shapes, two gloo ranks, checked for
the rows the GPU run will report and for its own checks passing (the split model's logits within tolerance of
the whole model's, ranks agreeing on every token)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_multi_gpu_benchmark_runs_on_the_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--device", "cpu", "--shapes", "tiny",
                           "--tokens", "24", "--prompt-tokens", "8", "--batch", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=240,
                          env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by = {}
    for row in rows:
        by.setdefault(row["measure"], []).append(row)
    assert {(r["tp"], r["batch"]) for r in by["tp_decode"]} == {(1, 2), (2, 2)}
    [scaling] = by["tp_scaling"]
    assert scaling["scaling"] > 0 and scaling["allreduce_ms_per_step"] > 0 and scaling["layers"] == 3
    ead_modes = {r["mode"] for r in by["tp_ead"]}
    assert ead_modes == {"small_only", "large_only", "ead_f0.1", "ead_f0.25", "ead_f0.43"}
    assert all(r["ranks_agree"] for r in by["tp_ead"]) and all("of_ideal" in r for r in by["tp_ead"]
                                                              if r["mode"].startswith("ead"))
    assert {(r["placement"], r["mode"]) for r in by["placement"]} == \
        {(p, m) for p in ("separate", "same") for m in ("small_only", "large_only", "ead_f0.25")}
    [logits] = by["check_logits"]
    assert logits["ok"] and logits["max_abs_diff"] <= 1e-4 * logits["max_abs_logit"], logits
    assert [r["ok"] for r in by["check_ranks_agree"]] == [True, True]
    assert not [r for r in rows if "error" in r]
    assert "| tiny-large | 2 |" in proc.stderr  # the Markdown table


def test_the_bf16_check_judges_the_split_against_the_float32_model():
    """In bf16 a split model's logits differ from the whole model's by rounding (flat random logits flip top-1s):
    the check passes when splitting adds no error beyond what bf16 rounding gives the whole model."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--device", "cpu", "--shapes", "tiny",
                           "--measure", "checks", "--checks-dtype", "bfloat16", "--tokens", "8",
                           "--prompt-tokens", "8", "--batch", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=240,
                          env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [logits] = [r for r in map(json.loads, proc.stdout.splitlines()) if r["measure"] == "check_logits"]
    assert logits["dtype"] == "bfloat16" and logits["ok"], logits
    assert 0 < logits["whole_vs_fp32_rel"] < 0.1 and logits["split_vs_fp32_rel"] <= 1.5 * logits["whole_vs_fp32_rel"]
