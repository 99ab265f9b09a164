"""Concurrency on loopback: many streaming clients at once through continuous batching, each getting exactly
what the offline path gives it alone; clients that disconnect mid-stream free their slots for others."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

import ead
from ead.config import RouterConfig
from ead.router import Router
from ead.sampling import SamplingParams
from ead.server.app import ServeConfig

from conftest import gsm8k_questions
from live import LiveServer, http, metric

CLIENTS, REQUESTS_EACH = 32, 4
TAUS = (0.0, 0.5, 1.0, float("inf"))


@pytest.fixture(scope="module")
def pair(tiny_pairs, one_thread):
    return ead.load_pair(*tiny_pairs["qwen2"], device="cpu")


def plan(i: int) -> dict:
    """Request i of the load: its own prompt, length, rule and sampler (half greedy, half seeded)."""
    sampled = i % 2 == 1
    return {"prompt": gsm8k_questions(40)[i % 40][:100], "max_tokens": 12 + i % 13, "tau": TAUS[i % 4],
            "window": 3 + i % 3, "d_min": i % 7, "temperature": 0.8 if sampled else 0.0, "seed": i if sampled else None}


async def stream_one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str, int]:
    p = plan(i)
    tau = p["tau"] if p["tau"] != float("inf") else "inf"
    stream = await client.completions.create(
        model="ead", prompt=p["prompt"], max_tokens=p["max_tokens"], temperature=p["temperature"], seed=p["seed"],
        stream=True, stream_options={"include_usage": True},
        extra_body={"ead": {"tau": tau, "window": p["window"], "d_min": p["d_min"]}})
    text, finish, tokens = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), finish, tokens


async def run_load(url: str) -> dict[int, tuple[str, str, int]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    results = {}

    async def one_client(c: int) -> None:
        for k in range(REQUESTS_EACH):
            i = c * REQUESTS_EACH + k
            results[i] = await stream_one(client, i)

    await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))
    await client.close()
    return results


def test_32_streaming_clients_each_get_the_offline_output(pair):
    n = CLIENTS * REQUESTS_EACH
    with LiveServer(pair, ServeConfig(), max_batch=16, max_queue=CLIENTS) as server:
        t0 = time.perf_counter()
        results = asyncio.run(run_load(server.url))
        seconds = time.perf_counter() - t0
        text = http("GET", f"{server.url}/metrics")[2].decode()

    plans = [plan(i) for i in range(n)]
    refs = ead.generate(
        pair, [p["prompt"] for p in plans], None,
        [SamplingParams(temperature=p["temperature"], seed=p["seed"], max_new_tokens=p["max_tokens"]) for p in plans],
        routers=[Router(RouterConfig.paper(tau=p["tau"], window=p["window"], d_min=p["d_min"])) for p in plans])
    assert len(results) == n
    mismatched = [i for i in range(n) if results[i] != (refs[i].text, refs[i].finish_reason, len(refs[i].token_ids))]
    assert not mismatched, (f"{len(mismatched)} of {n} differ from offline; first: request {mismatched[0]}: "
                            f"{results[mismatched[0]]!r} vs {refs[mismatched[0]].text!r}")
    assert metric(text, 'ead_http_responses_total{path="/v1/completions",code="200"}') == n
    assert sum(metric(text, f'ead_requests_total{{outcome="{o}"}}') for o in ("stop", "length")) == n
    assert metric(text, 'ead_requests_total{outcome="error"}') == 0
    assert metric(text, "ead_time_to_first_token_seconds_count") == n
    print(f"\n{n} requests, {sum(r[2] for r in results.values())} tokens in {seconds:.1f} s")


def test_disconnected_streams_are_cancelled_and_their_slots_reused(pair):
    with LiveServer(pair, ServeConfig(), max_batch=8, max_queue=0) as server:
        # Tiny models write 200 tokens in well under a second; a pause in each step (the real step still runs)
        # keeps the streams alive long enough to leave them halfway.
        engine = server.worker.engine
        real_step = engine.step
        engine.step = lambda: (time.sleep(0.01), real_step())[1]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        long = {"model": "ead", "prompt": "Natalia sold clips", "max_tokens": 200, "stream": True,
                "extra_body": {"ignore_eos": True}}
        streams = [client.completions.create(**long) for _ in range(8)]
        for s in streams:
            next(iter(s)), next(iter(s))  # two chunks each: all 8 are running
        assert server.metrics.running == 8

        with pytest.raises(openai.RateLimitError) as e:  # 8 slots, no queue: the 9th is refused at once
            client.completions.create(model="ead", prompt="x", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"

        for s in streams:
            s.close()  # the client leaves mid-stream
        deadline = time.monotonic() + 10
        while server.metrics.running or server.metrics.queue_depth:
            assert time.monotonic() < deadline, "cancelled streams kept their slots"
            time.sleep(0.02)
        text = http("GET", f"{server.url}/metrics")[2].decode()
        assert metric(text, 'ead_requests_total{outcome="cancelled"}') == 8
        generated = sum(metric(text, f'ead_generated_tokens_total{{model="{m}"}}') for m in ("small", "large"))
        assert generated < 8 * 200 / 2, "the cancelled generations ran on"

        async def eight_more() -> list:
            ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
            out = await asyncio.gather(*(ac.completions.create(model="ead", prompt=f"Question {k}", max_tokens=5)
                                         for k in range(8)))
            await ac.close()
            return out

        done = asyncio.run(eight_more())  # would be 429s if the 8 slots had not been freed
        assert [r.usage.completion_tokens for r in done] == [5] * 8

        # A client that gives up on a non-streamed request is noticed too.
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.5).completions.create(**{**long, "stream": False})
        while metric(http("GET", f"{server.url}/metrics")[2].decode(), 'ead_requests_total{outcome="cancelled"}') < 9:
            assert time.monotonic() < deadline + 10, "a timed-out non-streamed request was not cancelled"
            time.sleep(0.02)
        assert server.metrics.running == 0
