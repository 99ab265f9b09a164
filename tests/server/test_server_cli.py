"""`ead serve` from the command line: its flags, and a real server process started, used and stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

import ead
from ead.cli import build_parser
from ead.config import EngineConfig, RouterConfig
from ead.server.cli import cmd_serve


def test_serve_flags_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.handler is cmd_serve and args.small is None and args.large is None  # the default pair
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, None, 16, 64)
    assert args.schedule == "exact"
    args = build_parser().parse_args(["serve", "--small", "a", "--large", "b", "--tau", "1.5", "--window", "3",
                                      "--d-min", "2", "--max-batch", "4", "--max-queue", "0", "--api-key", "k",
                                      "--schedule", "throughput"])
    assert (args.tau, args.window, args.d_min, args.max_batch, args.max_queue) == (1.5, 3, 2, 4, 0)
    assert args.schedule == "throughput"


def test_the_schedule_reaches_the_engine(tiny_pairs):
    from ead.server.app import ServeConfig, create_app

    pair = ead.load_pair(*tiny_pairs["qwen2"], device="cpu")
    assert create_app(pair, ServeConfig(), max_batch=2).state.worker.engine.schedule == "exact"
    assert create_app(pair, ServeConfig(), max_batch=2, schedule="throughput").state.worker.engine.schedule == \
        "throughput"


def start_server(small: str, large: str, *flags: str) -> tuple[subprocess.Popen, int]:
    """`ead serve` in a process of its own on a free port, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EAD_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "ead.cli", "serve", "--small", small, "--large", large,
                             "--port", str(port), "--max-batch", "2", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "ead serve did not come up"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, port
        except OSError:
            time.sleep(0.2)


def test_ead_serve_process_serves_and_stops_on_ctrl_c(tiny_pairs):
    small, large = tiny_pairs["llama"]
    proc, port = start_server(small, large)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model="ead", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_calibration_file_made_for_another_pair(tiny_pairs, tmp_path, capsys):
    from ead.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tom has 3 apples and buys 5 more.\n")
    cal = tmp_path / "cal.json"
    llama = ["--small", tiny_pairs["llama"][0], "--large", tiny_pairs["llama"][1], "--device", "cpu"]
    assert main(["calibrate", *llama, "--large-share", "0.3", "--data", str(prompts), "--limit", "1",
                 "--max-new-tokens", "8", "--out", str(cal)]) == 0
    qwen = ["--small", tiny_pairs["qwen2"][0], "--large", tiny_pairs["qwen2"][1], "--device", "cpu"]
    assert main(["serve", *qwen, "--calibration", str(cal), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "Traceback" not in err


def test_ead_serve_with_the_large_model_split_over_two_processes(tiny_pairs):
    """Rank 0 serves and sends each round's requests to rank 1; concurrent requests get what one process writes."""
    small, large = tiny_pairs["qwen2"]
    router = RouterConfig(threshold_bits=1.0, window_tokens=2, min_dwell_tokens=2)
    prompts = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting.",
               "Betty is saving money for a new wallet."]
    pair = ead.load_pair(small, large, device="cpu")
    params = ead.SamplingParams(max_new_tokens=16, ignore_eos=True)
    expected = [r.text for r in ead.generate(pair, prompts, router, params, EngineConfig(backend="native"))]
    proc, port = start_server(small, large, "--device", "cpu", "--large-tp", "2", "--tau", "1.0", "--window", "2",
                              "--d-min", "2")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)

        def complete(prompt: str) -> str:
            r = client.completions.create(model="ead", prompt=prompt, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.choices[0].text

        with ThreadPoolExecutor(3) as pool:  # three requests, two slots: batched, one waits for a slot
            assert list(pool.map(complete, prompts)) == expected
        proc.send_signal(signal.SIGINT)  # passed on to both ranks; rank 0 tells rank 1 to stop
        assert proc.wait(30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
