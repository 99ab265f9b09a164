"""Calibration: the offline replay against shares computed by hand on injected streams (no model), prompt files,
the pair check of saved files, and `ead calibrate` end to end on a tiny pair."""

import json
import math

import pytest

import ead
from ead.calibrate import (RecordedStream, candidate_thresholds, choose_threshold, choose_thresholds, default_data_file,
                           load_calibration, load_prompts, record_streams, replay, save_calibration)
from ead.cli import main
from ead.config import RouterConfig
from ead.errors import ConfigError
from ead.router import TokenSignals
from ead.routing import RoutingConfig, make_router
from ead.sampling import SamplingParams

from conftest import gsm8k_questions


def stream(small, large):
    return RecordedStream(small=[TokenSignals(entropy_bits=h) for h in small],
                          large=[TokenSignals(entropy_bits=h) for h in large])


RULE = RoutingConfig(threshold=math.inf, window_tokens=1, min_dwell_tokens=0)


def test_replay_reads_each_token_from_the_model_active_in_the_replay():
    # tau 1, window 1, dwell 0. Token 0: small, 0 -> stays small. Token 1: small, 2 > 1 -> large. Token 2: large,
    # 0.5 <= 1 -> small. Tokens 3-4: small, 0. Token 5: small, 2 -> large (for a token that never comes).
    # The large model wrote 1 of 6. Reading the small stream alone would keep it large through token 2: 2 of 6.
    s = stream([0, 2, 2, 0, 0, 2], [0, 0.5, 0.5, 0, 0, 0.5])
    cfg = RoutingConfig(threshold=1.0, window_tokens=1, min_dwell_tokens=0)
    assert replay([s], cfg) == (1, 6, [1 / 6])
    assert replay([stream([0, 2, 2, 0, 0, 2], [0, 2, 2, 0, 0, 2])], cfg)[:2] == (2, 6)


def test_calibration_reproduces_a_pooled_share_computed_by_hand():
    # Prompt A (10 tokens): the small model is always unsure (2 bits), the large one sure (0.5). For tau in [0.5, 2)
    # they alternate s l s l ...: 5 of 10. Prompt B (4 tokens): both sure (0): 0 of 4 at any tau >= 0.
    # Pooled share at tau in [0.5, 2): 5 / 14; mean of per-prompt shares: (0.5 + 0) / 2. At tau in [0, 0.5) A goes
    # large after its first token and stays: 9 of 10, pooled 9 / 14; at tau >= 2, 0. The means are 0, 0.5 and 2, so
    # the candidates are 0 (half the smallest), the midpoints 0.25 and 1.25, and inf.
    streams = [stream([2.0] * 10, [0.5] * 10), stream([0.0] * 4, [0.0] * 4)]
    assert candidate_thresholds(streams, RULE) == [0.0, 0.25, 1.25, math.inf]
    cal = choose_threshold(streams, 0.3, RULE)
    assert (cal.threshold, cal.large_share, cal.mean_prompt_large_share, cal.tokens, cal.prompts) == (
        1.25, 5 / 14, 0.25, 14, 2)
    cal = choose_threshold(streams, 0.7, RULE)  # 0 and 0.25 both give 9 / 14: the upper median of the two
    assert (cal.threshold, cal.large_share) == (0.25, 9 / 14)
    assert choose_threshold(streams, 0.0, RULE).threshold == math.inf


def test_candidates_are_the_rolling_means_of_each_models_stream():
    # Window 2 over small (1, 3, 0) -> means 1, 2, 1.5; over large (0, 1, 1) -> 0, 0.5, 1: midpoints between them.
    cfg = RoutingConfig(threshold=math.inf, window_tokens=2, min_dwell_tokens=0)
    assert candidate_thresholds([stream([1, 3, 0], [0, 1, 1])], cfg) == [0.0, 0.25, 0.75, 1.25, 1.75, math.inf]


def test_top1_calibration_thresholds_are_difficulties_within_0_1():
    s = RecordedStream(small=[TokenSignals(0.0, top1_prob=p) for p in (0.9, 0.3, 0.3, 0.95)],
                       large=[TokenSignals(0.0, top1_prob=p) for p in (0.99, 0.8, 0.8, 0.99)])
    cfg = RoutingConfig(signal="top1", threshold=math.inf, window_tokens=1, min_dwell_tokens=0)
    taus = candidate_thresholds([s], cfg)
    # difficulties 0.01, 0.05, 0.1, 0.2, 0.7 -> half the smallest, then midpoints.
    assert taus[:-1] == pytest.approx([0.005, 0.03, 0.075, 0.15, 0.45]) and taus[-1] == math.inf
    # tau in [0.2, 0.7): token 1's 1 - 0.3 = 0.7 sends token 2 to the large model, whose 1 - 0.8 = 0.2 hands back.
    cal = choose_threshold([s], 0.25, cfg)
    assert cal.large_share == 0.25 and cal.threshold == pytest.approx(0.45)


def test_prompt_files(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question": "a?"}\n{"prompt": "b?"}\n\n{"problem": "c?", "x": 1}\n')
    assert load_prompts(tmp_path / "q.jsonl") == ["a?", "b?", "c?"]
    assert load_prompts(tmp_path / "q.jsonl", limit=2) == ["a?", "b?"]
    (tmp_path / "q.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(tmp_path / "q.txt") == ["first prompt", "second prompt"]
    (tmp_path / "bad.jsonl").write_text('{"question": "a?"}\n{"text": "b?"}\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON object with a string 'question'"):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="pass --data FILE"):
        load_prompts(tmp_path / "missing.jsonl")


def test_default_prompts_are_gsm8k_train(tmp_path):
    assert load_prompts(default_data_file(), limit=3) == gsm8k_questions(3)
    assert default_data_file(data_dir=str(tmp_path)) == tmp_path / "gsm8k_train.jsonl"


# ---- on the tiny pair ----

@pytest.fixture(scope="module")
def pairs(tiny_pairs):
    return {arch: ead.load_pair(*tiny_pairs[arch], device="cpu") for arch in ("qwen2", "llama")}


def test_teacher_forced_signals_match_the_small_models_own_run(pairs, one_thread):
    # The recorded small stream must be what the small model saw while writing: its entropies in the engine's trace.
    pair = pairs["qwen2"]
    prompt = "Natalia sold clips to 48 of her friends in April"
    [s] = record_streams(pair, [prompt], max_new_tokens=30)
    res = ead.Engine(pair, RouterConfig(threshold_bits=math.inf)).generate(pair.encode(prompt),
                                                                          SamplingParams(max_new_tokens=30))
    assert len(s.small) == len(s.large) == len(res.token_ids)
    got, want = [x.entropy_bits for x in s.small], [st.entropy_bits for st in res.trace.steps]
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert diff < 1e-4, f"max abs difference {diff:.2e} bits"
    assert all(not math.isnan(x.margin) for x in s.large)


def test_calibrate_command_end_to_end(pairs, tiny_pairs, tmp_path, capsys, one_thread):
    small, large = tiny_pairs["qwen2"]
    data = tmp_path / "prompts.txt"
    data.write_text("Natalia sold clips to 48 of her friends\nWeng earns $12 an hour for babysitting\n"
                    "Betty is saving money for a new wallet\n")
    out = tmp_path / "cal.json"
    code = main(["calibrate", "--small", small, "--large", large, "--device", "cpu", "--large-share", "0.3",
                 "--data", str(data), "--limit", "3", "--max-new-tokens", "24", "--window", "2", "--d-min", "2",
                 "--raw", "--out", str(out), "--check"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    record = json.loads(out.read_text())
    assert f"wrote {out}" in stdout and "prompt 3/3" in stderr
    assert record["target_large_share"] == 0.3 and record["prompts"] == 3
    assert record["settings"].items() >= {"signal": "entropy", "window_tokens": 2, "min_dwell_tokens": 2,
                                      "start": "small", "chat_template": False}.items()
    assert record["pair"]["small"]["source"] == small and len(record["pair"]["small"]["sha256"]) == 64
    assert 0 <= record["checked_large_share"] <= 1
    # The replayed share is the one the recorded streams give at tau, recomputed here from a fresh recording.
    pair = pairs["qwen2"]
    streams = record_streams(pair, data.read_text().splitlines(), max_new_tokens=24)
    cfg = RoutingConfig(threshold=record["tau"], window_tokens=2, min_dwell_tokens=2)
    n_large, n, _ = replay(streams, cfg)
    assert (n_large / n, n) == (pytest.approx(record["large_share"]), record["tokens"])
    assert abs(record["large_share"] - 0.3) <= 0.1  # 72 tokens in segments of >= 2: a coarse grid (0.306 measured)

    # The file hands tau out for this pair and these settings only.
    assert load_calibration(out, pair, cfg) == record["tau"]
    with pytest.raises(ConfigError, match="a tau does not carry over between pairs. Run `ead calibrate`"):
        load_calibration(out, pairs["llama"])
    with pytest.raises(ConfigError, match=r"calibrated with window_tokens 2 \(here 5\)"):
        load_calibration(out, pair, RoutingConfig(threshold=1.0, min_dwell_tokens=2))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a calibration file"):
        load_calibration(tmp_path / "junk.json", pair)

    # Wiring for `ead generate --calibration`: the loaded tau into the rule, the router into the engine.
    router = make_router(RoutingConfig(threshold=load_calibration(out, pair, cfg), window_tokens=2,
                                       min_dwell_tokens=2))
    res = ead.Engine(pair).generate(pair.encode("Natalia sold clips"), SamplingParams(max_new_tokens=10),
                                    router=router)
    assert res.stats.large_share == router.large_share


def test_calibrate_rejects_bad_targets_before_loading_models(capsys, tmp_path):
    code = main(["calibrate", "--small", str(tmp_path / "nope"), "--large", str(tmp_path / "nope"),
                 "--large-share", "1.5"])
    assert code == 2 and "fraction in [0, 1]" in capsys.readouterr().err


def test_save_calibration_writes_what_load_reads(pairs, tmp_path):
    from ead.calibrate import Calibration, pair_identity

    pair = pairs["llama"]
    cal = Calibration(threshold=0.75, target_large_share=0.25, large_share=0.26, mean_prompt_large_share=0.2,
                      tokens=100, prompts=4)
    settings = {"signal": "entropy", "window_tokens": 5, "min_dwell_tokens": 10, "start": "small"}
    save_calibration(tmp_path / "c.json", cal, pair_identity(pair), settings)
    assert load_calibration(tmp_path / "c.json", pair, RoutingConfig()) == 0.75
    with pytest.raises(ConfigError, match="signal 'entropy' \\(here 'top1'\\)"):
        load_calibration(tmp_path / "c.json", pair, RoutingConfig(signal="top1", threshold=0.3))


def test_several_targets_choose_as_one_target_each():
    streams = [stream([2.0] * 10, [0.5] * 10), stream([0.0] * 4, [0.0] * 4)]
    many = choose_thresholds(streams, [0.3, 0.7, 0.0], RULE)
    assert many == [choose_threshold(streams, f, RULE) for f in (0.3, 0.7, 0.0)]
    assert [c.threshold for c in many] == [1.25, 0.25, math.inf]


def test_calibrate_several_signals_and_targets_from_one_batched_recording(tiny_pairs, tmp_path, capsys, one_thread):
    """One call with --out-dir writes a file per (signal, target), each as a call for that signal and target alone
    would (greedy float32 on CPU: the batched recording writes the same answers as one at a time)."""
    small, large = tiny_pairs["qwen2"]
    data = tmp_path / "prompts.txt"
    data.write_text("Natalia sold clips to 48 of her friends\nWeng earns $12 an hour for babysitting\n"
                    "Betty is saving money for a new wallet\n")
    common = ["calibrate", "--small", small, "--large", large, "--device", "cpu", "--data", str(data),
              "--max-new-tokens", "16", "--window", "2", "--d-min", "2"]
    assert main([*common, "--signal", "entropy,top1", "--large-share", "0.2,0.4", "--batch", "3",
                 "--out-dir", str(tmp_path / "cal")]) == 0
    names = sorted(p.name for p in (tmp_path / "cal").iterdir())
    assert names == ["entropy-f0.2.json", "entropy-f0.4.json", "top1-f0.2.json", "top1-f0.4.json"]
    assert capsys.readouterr().err.count("prompt ") == 3  # one recording
    for signal, share in (("top1", "0.4"), ("entropy", "0.2")):
        assert main([*common, "--signal", signal, "--large-share", share, "--out", str(tmp_path / "one.json")]) == 0
        one = json.loads((tmp_path / "one.json").read_text())
        many = json.loads((tmp_path / "cal" / f"{signal}-f{share}.json").read_text())
        assert many["settings"]["signal"] == signal and many["target_large_share"] == float(share)
        assert (many["tau"], many["large_share"], many["tokens"]) == (one["tau"], one["large_share"], one["tokens"])


def test_several_files_need_an_out_dir(capsys, tmp_path):
    code = main(["calibrate", "--small", str(tmp_path / "nope"), "--large", str(tmp_path / "nope"),
                 "--signal", "entropy,margin", "--large-share", "0.25"])
    assert code == 2 and "make 2 files; say where they go with --out-dir DIR" in capsys.readouterr().err
    code = main(["calibrate", "--small", str(tmp_path / "nope"), "--large", str(tmp_path / "nope"),
                 "--signal", "loudness", "--large-share", "0.25"])
    assert code == 2 and "unknown routing signal 'loudness'" in capsys.readouterr().err
