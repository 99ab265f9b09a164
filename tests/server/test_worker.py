"""The engine thread's bookkeeping against what a client can observe: when a request's last event reaches it, the
server's metrics and its free slots already count the request as ended (a client that reads /metrics or sends its
next request right after its response must see that), for a finished request and for a failed step alike."""

import time

import pytest

import ead
from ead.config import RouterConfig
from ead.engine import BatchEngine
from ead.sampling import SamplingParams
from ead.server.prometheus import ServerMetrics
from ead.server.protocol import CompletionRequest
from ead.server.worker import EngineWorker, Failed, Submission, Tokens


@pytest.fixture(scope="module")
def pair(tiny_pairs, one_thread):
    return ead.load_pair(*tiny_pairs["qwen2"], device="cpu")


def request(tokens: int) -> CompletionRequest:
    return CompletionRequest(chat=False, model="ead", prompt=[5, 9, 40, 41], max_tokens=tokens, stream=False,
                             sampling=SamplingParams(max_new_tokens=tokens), router=RouterConfig(),
                             include_usage=False)


def observe(worker: EngineWorker, metrics: ServerMetrics, seen: list):
    """A deliver function that records, at each request's last event, what a client could read right then."""
    def deliver(event):
        if isinstance(event, Failed) or (isinstance(event, Tokens) and event.result is not None):
            free = worker.slots.acquire(blocking=False)
            if free:
                worker.slots.release()
            seen.append((type(event).__name__, metrics.running, dict(metrics.finished), free))
    return deliver


@pytest.mark.parametrize("fail", [False, True])
def test_a_requests_last_event_comes_after_the_books(pair, fail):
    metrics = ServerMetrics()
    worker = EngineWorker(pair, lambda: BatchEngine(pair, max_batch=1), metrics, capacity=1)
    if fail:
        real_step = worker.engine.step
        calls = []
        worker.engine.step = lambda: real_step() if calls.append(1) or len(calls) < 3 else 1 / 0
    seen = []
    sub = Submission(request=request(6), deliver=observe(worker, metrics, seen), arrived_s=time.perf_counter())
    assert worker.try_submit(sub)
    while not sub.done:
        try:
            worker._round()
        except ZeroDivisionError as e:  # what `run` does with a failed round
            worker._fail_all(e)
    outcome = "error" if fail else "length"
    assert seen == [("Failed" if fail else "Tokens", 0, {outcome: 1}, True)]
