"""`ead serve` from the command line: its flags, and a real server process started, used and stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai

from ead.cli import build_parser
from ead.server.cli import cmd_serve


def test_serve_flags_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.handler is cmd_serve and args.small is None and args.large is None  # the default pair
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, None, 16, 64)
    args = build_parser().parse_args(["serve", "--small", "a", "--large", "b", "--tau", "1.5", "--window", "3",
                                      "--d-min", "2", "--max-batch", "4", "--max-queue", "0", "--api-key", "k"])
    assert (args.tau, args.window, args.d_min, args.max_batch, args.max_queue) == (1.5, 3, 2, 4, 0)


def test_ead_serve_process_serves_and_stops_on_ctrl_c(tiny_pairs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small, large = tiny_pairs["llama"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EAD_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "ead.cli", "serve", "--small", small, "--large", large,
                             "--port", str(port), "--max-batch", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "ead serve did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
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
