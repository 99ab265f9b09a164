"""The `ead` command end to end on tiny models: output modes, and every bad input as one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ead.cli import main

from conftest import build_model


@pytest.fixture(scope="module")
def models(tiny_pairs):
    small, large = tiny_pairs["qwen2"]
    return ["--small", small, "--large", large, "--device", "cpu"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_text_and_a_summary_line(capsys, models):
    code, out, err = run(capsys, "generate", *models, "--raw", "--max-new-tokens", "12", "Natalia sold clips")
    assert code == 0 and out.strip()
    assert "tokens, large share" in err and "Traceback" not in err


def test_json_output_is_the_full_result(capsys, models):
    code, out, _ = run(capsys, "generate", *models, "--json", "--tau", "1.5", "--window", "2", "--d-min", "2",
                       "--max-new-tokens", "20", "--ignore-eos", "How many clips?")
    result = json.loads(out)
    assert code == 0 and len(result["token_ids"]) == 20 == len(result["trace"]["steps"])
    assert set(result["stats"]) >= {"tokens_small", "tokens_large", "large_share", "switches", "catchup_tokens",
                                    "cost_ratio", "seconds", "tokens_per_s"}
    assert {s["role"] for s in result["trace"]["steps"]} <= {"small", "large"}


def test_trace_marks_large_text_and_prints_the_table(capsys, models):
    code, out, _ = run(capsys, "generate", *models, "--trace", "--color", "never", "--tau=-inf", "--d-min", "0",
                       "--start", "large", "--max-new-tokens", "10", "--ignore-eos", "Hello")
    assert code == 0
    assert "\u27e6" in out and "generated tokens" in out and "cost (paper, parameter-weighted): 1.000" in out


def test_trace_html_is_a_self_contained_page(capsys, models, tmp_path):
    page = tmp_path / "trace.html"
    code, _, err = run(capsys, "generate", *models, "--trace-html", str(page), "--tau", "2", "--d-min", "3",
                       "--max-new-tokens", "30", "--ignore-eos", "Hello")
    html = page.read_text()
    assert code == 0 and "wrote" in err
    assert html.startswith("<!doctype html>") and "<svg" in html and "http" not in html.split("</style>")[1]
    assert html.count('title="token ') == 30


@pytest.mark.parametrize("argv, message", [
    (["--tau", "-1"], "ConfigError: tau must be >= 0"),
    (["--tau", "nan"], "ConfigError: tau must be a number"),
    (["--window", "0"], "ConfigError: window must be an integer >= 1"),
    (["--d-min", "-3"], "ConfigError: d_min must be an integer >= 0"),
    (["--temperature", "-0.5"], "ConfigError: temperature must be"),
    (["--top-p", "0"], "ConfigError: top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "ConfigError: max_new_tokens must be"),
    (["--mode", "speculative", "--schedule", "throughput"], "ConfigError: schedule 'throughput' applies to mode"),
])
def test_invalid_settings_exit_2_with_one_line(capsys, models, argv, message):
    code, out, err = run(capsys, "generate", *models, *argv, "Hello")
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_models_and_prompts_exit_2_with_the_fix(capsys, models, tiny_pairs, other_tokenizer_model, tmp_path):
    small = tiny_pairs["qwen2"][0]
    cases = [
        (["--small", small, "--large", str(tmp_path / "nope.gguf")], "Hello", "ModelLoadError: GGUF file"),
        (["--small", small, "--large", other_tokenizer_model], "Hello", "TokenizerMismatchError"),
        (models + ["--raw"], "", "RequestError: the prompt is empty"),
        (models + ["--raw"], "x " * 400, "CacheCapacityError"),
        (["--small", small], "Hello", "ConfigError: pass both"),
    ]
    for argv, prompt, message in cases:
        code, _, err = run(capsys, "generate", *argv, "--device", "cpu", prompt)
        assert code == 2 and message in err, err


def cli(*argv, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ead.cli", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_offline_hub_id_fails_fast_naming_it():
    t0 = time.monotonic()
    p = cli("generate", "--small", "Qwen/Qwen2.5-0.5B-Instruct", "--large", "Qwen/Qwen2.5-1.5B-Instruct", "Hi")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Qwen/Qwen2.5-0.5B-Instruct" in err and "local folder" in err
    assert time.monotonic() - t0 < 60 and "Traceback" not in err


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory, tiny_pairs):
    """Models with a long context, so generation runs long enough to be interrupted."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pairs["qwen2"][0])
    folders = []
    for name, layers in (("small", 2), ("large", 4)):
        folder = tmp_path_factory.mktemp("slow") / name
        model = build_model("qwen2", len(tok), 128, layers, seed=layers)
        model.config.max_position_embeddings = 100_000
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def test_ctrl_c_during_generation_exits_cleanly(slow_pair):
    p = cli("generate", "--small", slow_pair[0], "--large", slow_pair[1], "--device", "cpu", "--raw",
            "--ignore-eos", "--max-new-tokens", "90000", "Natalia sold clips")
    first = p.stdout.read(1)  # generation has started once text arrives
    assert first
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted after" in err and "Traceback" not in err


def large_tokens(capsys, models, *flags):
    code, out, err = run(capsys, "generate", *models, "--json", "--window", "2", "--d-min", "2",
                         "--max-new-tokens", "24", "--ignore-eos", *flags, "How many clips?")
    assert code == 0, err
    return json.loads(out)["stats"]["tokens_large"]


def test_routing_flags_reach_the_router(capsys, models):
    # margin is read as 1 - (top-1 minus top-2 probability), always in [0, 1]: above tau 1 never, above 0
    # (nearly) always once the dwell allows.
    assert large_tokens(capsys, models, "--signal", "margin", "--tau", "1.0") == 0
    assert large_tokens(capsys, models, "--signal", "margin", "--tau", "0") > 0
    # budget mode, starting at tau 6.6 bits, the tiny models' median entropy: a target share of 1 pulls tau
    # down and 0 pushes it up, so the first run has the large model write more
    more = large_tokens(capsys, models, "--tau", "6.6", "--large-share", "1.0")
    assert more > large_tokens(capsys, models, "--tau", "6.6", "--large-share", "0.0")


@pytest.mark.parametrize("flags, message", [
    (["--tau", "0.5", "--tau-down", "0.9"], "ConfigError"),
    (["--large-share", "1.5"], "ConfigError"),
])
def test_bad_routing_flags_are_one_line_errors(capsys, models, flags, message):
    code, out, err = run(capsys, "generate", *models, "--max-new-tokens", "4", *flags, "Hi")
    assert code == 2 and message in err and "Traceback" not in err


def test_budget_flags_are_mutually_exclusive(capsys, models):
    with pytest.raises(SystemExit) as e:
        main(["generate", *models, "--large-share", "0.3", "--cost-ratio", "0.5", "Hi"])
    assert e.value.code == 2


def test_a_calibration_file_for_another_pair_is_refused(capsys, models, tmp_path, tiny_pairs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tom has 3 apples and buys 5 more.\n")
    cal = tmp_path / "cal.json"
    code, _, err = run(capsys, "calibrate", "--small", tiny_pairs["llama"][0], "--large", tiny_pairs["llama"][1],
                       "--device", "cpu", "--large-share", "0.3", "--data", str(prompts), "--limit", "1",
                       "--max-new-tokens", "8", "--out", str(cal))
    assert code == 0, err
    code, _, err = run(capsys, "generate", *models, "--calibration", str(cal), "--max-new-tokens", "4", "Hi")
    assert code == 2 and "ConfigError" in err and "Traceback" not in err
