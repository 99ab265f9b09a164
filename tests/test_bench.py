"""`ead bench` on the CPU at tiny shapes: the schedules side by side, each EAD row labelled, the realised and
routed large shares consistent with the ride-along tokens counted."""

import json

import pytest

from ead.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_runs_each_schedule_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "--pair", "tiny:tiny-large", "--batch", "1,3", "--tokens", "12", "--prompt-tokens", "8",
            "--hf-tokens", "0", "--gamma", "0", "--shares", "0.4", "--device", "cpu", "--schedule",
            "exact,throughput", "--out", str(out)]
    assert main(argv) == 0
    rows = [r for r in map(json.loads, out.read_text().splitlines()) if r.get("config") == "engine"]
    assert not [r for r in rows if "error" in r]
    modes = {(r["batch"], r["mode"]): r for r in rows}
    assert set(modes) == {(1, "small_only"), (1, "large_only"), (1, "ead_f0.4"),  # batch 1: exact only
                          (3, "small_only"), (3, "large_only"), (3, "ead_f0.4"), (3, "ead_f0.4_throughput")}
    for r in rows:
        assert r["schedule"] == ("throughput" if r["mode"].endswith("_throughput") else "exact")
        assert r["large_share"] - r["routed_large_share"] == pytest.approx(r["ride_along_tokens"] / r["tokens"])
        assert r["row_ms_per_token"] > 0 and r["vs_large_only"] > 0
    assert modes[3, "ead_f0.4"]["ride_along_tokens"] == 0  # exact: every token by the routed model
    # The same scripted routes under both schedules.
    assert modes[3, "ead_f0.4"]["routed_large_share"] == modes[3, "ead_f0.4_throughput"]["routed_large_share"]
    assert "| 3 | ead_f0.4_throughput |" in capsys.readouterr().err


def test_bench_refuses_an_unknown_schedule(capsys):
    assert main(["bench", "--pair", "", "--device", "cpu", "--schedule", "exact,fast"]) == 2
    assert "--schedule takes a comma-separated list of exact, throughput" in capsys.readouterr().err


def test_no_lookahead_reaches_every_engine_the_bench_builds(monkeypatch):
    from ead.engine import BatchEngine

    seen, init = [], BatchEngine.__init__

    def spy(self, pair, cfg=None, engine_cfg=None, *args, **kwargs):
        seen.append(engine_cfg.lookahead)
        init(self, pair, cfg, engine_cfg, *args, **kwargs)

    monkeypatch.setattr(BatchEngine, "__init__", spy)
    argv = ["bench", "--pair", "tiny:tiny-large", "--batch", "1", "--tokens", "4", "--prompt-tokens", "4",
            "--hf-tokens", "0", "--gamma", "0", "--shares", "0.4", "--device", "cpu"]
    for flag, expected in (([], True), (["--no-lookahead"], False)):
        seen.clear()
        assert main(argv + flag) == 0
        assert seen and set(seen) == {expected}


def test_guard_and_phase_options_reach_the_engine_and_are_reported(monkeypatch, capsys):
    """--guard-rounds and --large-phase reach BatchEngine; a bad --large-phase is a usage error saying what to
    give."""
    from ead.engine import BatchEngine

    seen, init = [], BatchEngine.__init__

    def spy(self, *args, **kwargs):
        seen.append((kwargs.get("guard_rounds"), kwargs.get("large_phase")))
        init(self, *args, **kwargs)

    monkeypatch.setattr(BatchEngine, "__init__", spy)
    argv = ["bench", "--pair", "tiny:tiny-large", "--batch", "2", "--tokens", "4", "--prompt-tokens", "4",
            "--hf-tokens", "0", "--gamma", "0", "--shares", "0.4", "--device", "cpu", "--schedule", "throughput"]
    assert main(argv + ["--guard-rounds", "0", "--large-phase", "0.6,0.1"]) == 0
    assert set(seen) == {(0, (0.6, 0.1))}
    seen.clear()
    assert main(argv + ["--large-phase", "off"]) == 0
    assert set(seen) == {(32, None)}
    seen.clear()
    assert main(argv) == 0  # the engine's default phases
    assert set(seen) == {(32, (0.5, 0.2))} and BatchEngine(*_tiny_args()).large_phase == (0.5, 0.2)
    with pytest.raises(SystemExit):
        main(argv + ["--large-phase", "0.2,0.5"])
    assert "need 0 <= LOW <= HIGH <= 1, got '0.2,0.5'" in capsys.readouterr().err


def _tiny_args():
    import torch

    from ead.bench import random_pair

    return (random_pair("tiny", "tiny-large", torch.device("cpu"), torch.device("cpu"), torch.float32),)


def test_waves_send_more_rows_than_slots_through_the_batch(tmp_path):
    """--waves 3 at batch 2: 6 rows through 2 slots, every row to its full length, in every mode; fewer than one
    wave is refused."""
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "--pair", "tiny:tiny-large", "--batch", "2", "--tokens", "10", "--prompt-tokens", "6",
            "--hf-tokens", "0", "--gamma", "0", "--shares", "0.4", "--device", "cpu", "--schedule",
            "exact,throughput", "--out", str(out)]
    assert main(argv + ["--waves", "3"]) == 0
    rows = [r for r in map(json.loads, out.read_text().splitlines()) if r.get("config") == "engine"]
    assert len(rows) == 4 and not [r for r in rows if "error" in r]
    for r in rows:
        assert (r["rows"], r["tokens"]) == (6, 60), r["mode"]
        assert r["rows_per_round_small"] <= 2 and r["rows_per_round_large"] <= 2
    assert main(argv + ["--waves", "0"]) == 2
