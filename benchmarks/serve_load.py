"""How much does `ead serve` deliver under concurrent streaming load, and how long do clients wait?

Starts `ead serve` in its own process (the real CLI path, on 127.0.0.1 and a free port), or uses a running
server (--url), then drives it with `--clients` concurrent streaming clients of the official openai client, each
sending `--requests` completions one after another with `ignore_eos`, so every request writes exactly
`--max-tokens` tokens. One warm-up request first, reported apart. Timings are taken by the clients:

- ttft_ms: from sending a request to its first text chunk (queueing + prefill + one step);
- tpot_ms: per request, (last chunk - first chunk) / (tokens - 1): the per-token latency a reader sees;
- throughput: generated tokens of all requests / wall-clock seconds of the load phase;
- with --offline, the same requests through `BatchEngine.generate_many` in this process once the server has
  stopped (same max_batch, one warm-up first): what the engine does without HTTP, for the server's overhead.

Percentiles are over requests. The server's /metrics adds the large model's token share. One JSON object on
stdout; a short summary on stderr.

    python benchmarks/serve_load.py --tiny --clients 32 --requests 4 --max-tokens 32    # tiny random pair
    python benchmarks/serve_load.py --clients 4 --requests 2 --max-tokens 48           # the default pair
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8             # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Natalia sold clips to 48 of her friends in April", "Weng earns $12 an hour for babysitting.",
           "Betty is saving money for a new wallet which costs $100.", "James writes a 3-page letter to 2 friends",
           "Mark has a garden with flowers. He planted plants of three", "Albert is wondering how much pizza he can eat",
           "Ken created a care package to send to his brother", "Alexis is applying for a new job and bought"]


def build_tiny_pair(root: Path) -> tuple[str, str]:
    """The test suite's tiny random Qwen2 pair (1 layer of width 32, 2 of width 64; 256 positions)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_model, build_tokenizer, gsm8k_questions

    tok = build_tokenizer(384, gsm8k_questions(400))
    folders = []
    for name, hidden, layers in (("small", 32, 1), ("large", 64, 2)):
        build_model("qwen2", len(tok), hidden, layers, seed=100 + layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        folders.append(str(root / name))
    return folders[0], folders[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, models: tuple[str, str] | None) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "ead.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-queue", str(args.clients), "--tau", str(args.tau), "--backend", args.backend]
    if models:
        cmd += ["--small", models[0], "--large", models[1]]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not args.verbose else None,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"ead serve exited with status {proc.returncode}; rerun with --verbose")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stream = await client.completions.create(model="ead", prompt=prompt, max_tokens=max_tokens, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    first = last = None
    tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": (first or time.perf_counter()) - t0, "tokens": tokens,
            "tpot_s": (last - first) / (tokens - 1) if first and tokens > 1 else None}


async def run_load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[dict], int, float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=os.environ.get("EAD_API_KEY", "none"), max_retries=0,
                                timeout=3600)
    await one_request(client, PROMPTS[0], max_tokens)  # warm-up, outside the timed phase
    results, errors = [], 0

    async def one_client(c: int) -> None:
        nonlocal errors
        for k in range(requests):
            try:
                results.append(await one_request(client, PROMPTS[(c + k) % len(PROMPTS)], max_tokens))
            except openai.OpenAIError as e:
                errors += 1
                print(f"error: {e}", file=sys.stderr)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    seconds = time.perf_counter() - t0
    await client.close()
    return results, errors, seconds


def offline_throughput(args: argparse.Namespace, models: tuple[str, str] | None) -> float:
    """Tokens/s of the same requests through the engine alone, all queued at once."""
    import torch

    import ead
    from ead.config import EngineConfig
    from ead.engine import BatchEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    pair = ead.load_pair(*(models or (None, None)), progress=False)
    engine = BatchEngine(pair, ead.RouterConfig(threshold_bits=args.tau), EngineConfig(backend=args.backend),
                         max_batch=args.max_batch)
    sampling = ead.SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)
    engine.generate_many([pair.encode(PROMPTS[0])], sampling)  # warm-up
    prompts = [pair.encode(PROMPTS[(c + k) % len(PROMPTS)]) for c in range(args.clients) for k in range(args.requests)]
    t0 = time.perf_counter()
    results = engine.generate_many(prompts, sampling)
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def large_share(url: str) -> float | None:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("ead_large_token_share "):
            return float(line.split()[1])
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server; default: start `ead serve` here")
    p.add_argument("--tiny", action="store_true", help="serve the test suite's tiny random pair")
    p.add_argument("--small"), p.add_argument("--large")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--backend", default="auto", help="the engine's backend: auto, hf or native")
    p.add_argument("--offline", action="store_true", help="also time the same requests without the server")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server (OMP_NUM_THREADS); 1 suits the tiny pair on a busy machine")
    p.add_argument("--verbose", action="store_true", help="show the server's log")
    args = p.parse_args()

    proc, startup_s = None, None
    with tempfile.TemporaryDirectory() as tmp:
        models = build_tiny_pair(Path(tmp)) if args.tiny else (args.small, args.large) if args.small else None
        url = args.url
        if url is None:
            proc, url, startup_s = start_server(args, models)
        try:
            results, errors, seconds = asyncio.run(run_load(url, args.clients, args.requests, args.max_tokens))
            share = large_share(url)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        offline = offline_throughput(args, models) if args.offline and args.url is None else None

    ttft = [r["ttft_s"] * 1e3 for r in results]
    tpot = [r["tpot_s"] * 1e3 for r in results if r["tpot_s"] is not None]
    tokens = sum(r["tokens"] for r in results)
    out = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_1m": os.getloadavg()[0], "pair": "tiny" if args.tiny else (f"{args.small} -> {args.large}"
                                                                            if args.small else "default"),
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "max_batch": args.max_batch, "tau": args.tau, "server_threads": args.threads, "server_startup_s": startup_s,
        "requests": len(results), "errors": errors, "generated_tokens": tokens, "seconds": seconds,
        "throughput_tok_per_s": tokens / seconds, "requests_per_s": len(results) / seconds,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p95": percentile(ttft, 95),
        "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p95": percentile(tpot, 95),
        "large_token_share": share, "offline_tok_per_s": offline, "backend": args.backend,
    }
    print(json.dumps(out))
    print(f"{len(results)} requests ({errors} errors), {tokens} tokens in {seconds:.1f} s: "
          f"{out['throughput_tok_per_s']:.1f} tok/s; TTFT p50 {out['ttft_ms_p50']:.0f} ms, p95 "
          f"{out['ttft_ms_p95']:.0f} ms; per token p50 {out['tpot_ms_p50']:.1f} ms, p95 {out['tpot_ms_p95']:.1f} ms"
          + (f"; offline {offline:.1f} tok/s" if offline else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
