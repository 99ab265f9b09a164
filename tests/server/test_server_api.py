"""The OpenAI-compatible API, driven by the official `openai` client against a live server on 127.0.0.1 running
tiny models (no mocked engine). Every answer is compared with the offline path, `ead.generate`, run on the same
pair with the same settings; every error is checked for its status and OpenAI's error shape."""

from __future__ import annotations

import json
import math

import openai
import pytest

import ead
from ead.config import RouterConfig
from ead.sampling import SamplingParams
from ead.server.app import ServeConfig

from conftest import gsm8k_questions
from live import LiveServer, error_of, http, metric

KEY = "test-key"
MAX_BODY_BYTES = 64 << 10
PROMPT = "Natalia sold clips to 48 of her friends in April"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 17*23?"}]


@pytest.fixture(scope="module")
def pair(tiny_pairs, one_thread):
    return ead.load_pair(*tiny_pairs["qwen2"], device="cpu")


@pytest.fixture(scope="module")
def server(pair):
    with LiveServer(pair, ServeConfig(api_key=KEY, max_body_bytes=MAX_BODY_BYTES), max_batch=4, max_queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def offline(pair, prompt, cfg: RouterConfig | None = None, **sampling) -> ead.GenerateResult:
    return ead.generate(pair, prompt, cfg, SamplingParams(**sampling))[0]


def test_completion_equals_offline_generate(client, pair):
    r = client.completions.create(model="ead", prompt=PROMPT, max_tokens=24, temperature=0)
    ref = offline(pair, PROMPT, max_new_tokens=24)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.object == "text_completion" and r.model == "ead" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(pair.encode(PROMPT))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["ead"]
    assert extra["tokens_small"] == ref.stats.tokens_small and extra["tokens_large"] == ref.stats.tokens_large
    assert extra["large_share"] == pytest.approx(ref.stats.large_share)
    assert extra["switches"] == ref.stats.switches
    assert extra["tokens_small"] + extra["tokens_large"] == r.usage.completion_tokens


def test_chat_with_seeded_sampling_and_ead_settings_equals_offline(client, pair):
    ead_settings = {"tau": 0.0, "window": 3, "d_min": 4}
    r = client.chat.completions.create(model="ead", messages=MESSAGES, max_tokens=30, temperature=0.9, top_p=0.95,
                                       seed=7, extra_body={"ead": ead_settings})
    ref = offline(pair, MESSAGES, RouterConfig.paper(tau=0.0, window=3, d_min=4), max_new_tokens=30,
                  temperature=0.9, top_p=0.95, seed=7)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.completion_tokens == len(ref.token_ids)
    extra = r.model_extra["ead"]
    assert (extra["tau"], extra["window"], extra["d_min"]) == (0.0, 3, 4)
    assert (extra["tokens_large"], extra["switches"]) == (ref.stats.tokens_large, ref.stats.switches)


@pytest.mark.parametrize("tau, small_only", [("inf", True), ("-inf", False)])
def test_ead_tau_extremes_route_as_the_paper_says(client, tau, small_only):
    r = client.completions.create(model="ead", prompt=PROMPT, max_tokens=20, extra_body={
        "ead": {"tau": tau, "d_min": 0}, "ignore_eos": True})
    extra = r.model_extra["ead"]
    assert r.usage.completion_tokens == 20
    if small_only:  # tau = inf never calls the large model
        assert (extra["tokens_large"], extra["large_share"], extra["switches"]) == (0, 0.0, 0)
    else:  # tau = -inf: the small model writes the first token, the large one every token after it
        assert (extra["tokens_small"], extra["tokens_large"], extra["switches"]) == (1, 19, 1)
    assert extra["tau"] == tau


def test_stop_string_is_cut_and_never_streamed(client, pair):
    ref = offline(pair, PROMPT, max_new_tokens=30, ignore_eos=True)
    stop = ref.text[8:10]  # a string the greedy text is known to contain
    cut = ref.text[:ref.text.find(stop)]
    r = client.completions.create(model="ead", prompt=PROMPT, max_tokens=30, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="ead", prompt=PROMPT, max_tokens=30, stop=stop, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_streamed_completion_with_usage(client, pair):
    chunks = list(client.completions.create(model="ead", prompt=PROMPT, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}))
    ref = offline(pair, PROMPT, max_new_tokens=24)
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == ref.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == ref.finish_reason
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in text_chunks[:-1])
    assert len(text_chunks) > 2 and len({c.id for c in chunks}) == 1  # streamed in pieces, one id
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == len(ref.token_ids)
    assert usage_chunk.usage.prompt_tokens == len(pair.encode(PROMPT))
    assert usage_chunk.model_extra["ead"]["tokens_large"] == ref.stats.tokens_large
    assert text_chunks[-1].model_extra["ead"]["switches"] == ref.stats.switches


def test_streamed_chat(client, pair):
    chunks = list(client.chat.completions.create(model="ead", messages=MESSAGES, max_tokens=24, stream=True))
    ref = offline(pair, MESSAGES, max_new_tokens=24)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)


def test_raw_stream_ends_with_done(server):
    body = json.dumps({"model": "ead", "prompt": PROMPT, "max_tokens": 5, "stream": True}).encode()
    status, headers, raw = http("POST", f"{server.url}/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_models_health_and_metrics(client, server):
    [model] = client.models.list().data
    assert model.id == "ead" and model.owned_by == "ead"
    assert model.model_extra["ead"]["max_model_len"] == server.worker.max_seq_tokens
    status, _, body = http("GET", f"{server.url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    client.completions.create(model="ead", prompt=PROMPT, max_tokens=3)
    status, headers, body = http("GET", f"{server.url}/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    small = metric(text, 'ead_generated_tokens_total{model="small"}')
    large = metric(text, 'ead_generated_tokens_total{model="large"}')
    assert small + large > 0 and metric(text, "ead_large_token_share") == pytest.approx(large / (small + large),
                                                                                        abs=1e-6)
    assert metric(text, "ead_time_to_first_token_seconds_count") >= 1
    assert metric(text, "ead_time_per_output_token_seconds_count") >= 1
    assert metric(text, 'ead_http_responses_total{path="/v1/completions",code="200"}') >= 1
    for name in ("ead_queue_depth", "ead_running_requests", 'ead_requests_total{outcome="length"}'):
        metric(text, name)


# --- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("temperature", 5), ("top_p", 0), ("max_tokens", 0), ("stop", [""]),
                                          ("seed", "x"), ("stream", "yes"), ("logprobs", 3),
                                          ("ead", {"tau": -1}), ("ead", {"window": 0}), ("ead", {"speed": 1})])
def test_invalid_field_is_400_naming_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ead", prompt=PROMPT, extra_body={field: value})
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"].startswith(field), err


def test_n_above_one_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ead", messages=MESSAGES, n=2)
    assert e.value.body["param"] == "n" and "'n' must be 1" in e.value.body["message"]


def test_too_long_prompt_is_400(client, server):
    long_prompt = " ".join(gsm8k_questions(20))  # far more than the tiny models' 256 positions
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ead", prompt=long_prompt)
    assert e.value.body["code"] == "context_length_exceeded"
    assert str(server.worker.max_seq_tokens) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, not with what max_tokens asks for
        client.completions.create(model="ead", prompt=PROMPT, max_tokens=server.worker.max_seq_tokens)
    assert e.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", "\"caf\xe9\"".encode("latin-1")])
def test_malformed_json_is_400(server, body):
    status, _, raw = http("POST", f"{server.url}/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and error_of(raw)["type"] == "invalid_request_error"


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="ead", prompt=PROMPT)
    assert e.value.body["code"] == "invalid_api_key"
    status, headers, raw = http("POST", f"{server.url}/v1/completions", b"{}")
    assert status == 401 and error_of(raw)["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    assert http("GET", f"{server.url}/health")[0] == 200  # health and metrics stay open for probes


def test_unknown_model_and_route_are_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found" and "'ead'" in e.value.body["message"]
    status, _, raw = http("GET", f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 404 and error_of(raw)["code"] == "not_found"


def test_oversized_body_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="ead", prompt="x" * (2 * MAX_BODY_BYTES))
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


@pytest.mark.parametrize("stream", [False, True])
def test_engine_failure_fails_its_requests_with_500_and_the_server_keeps_serving(client, server, stream):
    """A fault injected into one engine step (the real engine runs; only that step raises): the request in it
    gets a 500-shaped error (a streamed one, an error event), and the next requests are served normally."""
    errors_before = metric(http("GET", f"{server.url}/metrics")[2].decode(), "ead_engine_errors_total")
    engine = server.worker.engine
    real_step = engine.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return real_step()

    engine.step = failing_step
    if stream:
        with pytest.raises(openai.APIError) as e:
            list(client.completions.create(model="ead", prompt=PROMPT, max_tokens=10, stream=True))
    else:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="ead", prompt=PROMPT, max_tokens=10)
    assert e.value.body["type"] == "server_error" and "injected fault" in e.value.body["message"]
    assert server.worker.engine is not engine  # a fresh engine replaced the one whose step failed
    r = client.completions.create(model="ead", prompt=PROMPT, max_tokens=10)
    assert r.usage.completion_tokens == 10
    text = http("GET", f"{server.url}/metrics")[2].decode()
    assert metric(text, "ead_engine_errors_total") == errors_before + 1
    assert metric(text, "ead_running_requests") == 0


def test_bad_requests_never_stop_the_server(client, server):
    for body in (b"null", b'{"prompt": null}', b'{"messages": [{"role": 1}]}', b'{"prompt": [1e400]}',
                 b'{"prompt": [999999]}', b'{"prompt": "x", "ead": {"tau": NaN}}', b'[' * 50000):
        status, _, raw = http("POST", f"{server.url}/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
        assert status == 400, (body[:40], raw)
        error_of(raw)
    status, _, raw = http("POST", f"{server.url}/v1/chat/completions", b'{"messages": [{"role": 1}]}',
                          {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and error_of(raw)["param"] == "messages[0]"
    r = client.completions.create(model="ead", prompt=PROMPT, max_tokens=4)
    assert r.usage.completion_tokens == 4 and not math.isnan(r.model_extra["ead"]["large_share"])


def test_a_speculative_server_writes_the_large_models_text(pair):
    """`ead serve --mode speculative`: each request's text is the large model's greedy text (offline, large
    only), drafted by the small model; the ead extras count every token as the large model's."""
    import math

    from ead.config import Role

    large_only = RouterConfig(threshold_bits=-math.inf, min_dwell_tokens=0, start=Role.LARGE)
    with LiveServer(pair, ServeConfig(), max_batch=2, max_queue=4, mode="speculative") as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60)
        for prompt in (PROMPT, "Weng earns $12 an hour for babysitting."):
            got = client.completions.create(model="ead", prompt=prompt, max_tokens=24,
                                            extra_body={"ignore_eos": True})
            want = offline(pair, prompt, large_only, max_new_tokens=24, ignore_eos=True)
            assert got.choices[0].text == want.text
            assert got.model_extra["ead"]["tokens_small"] == 0
