"""What GET /metrics reports, in the Prometheus text format (version 0.0.4), written by hand: a few counters,
two latency histograms and two gauges need no client library.

The engine thread records tokens and latencies, the event loop records HTTP responses, so every update and the
rendering hold one lock. Per-request summaries (large share of one answer) come from ead.metrics; these are
server-wide running totals.
"""

from __future__ import annotations

import threading
from collections import Counter

from ead.config import Role

# Seconds. TTFT spans queueing and prefill (ms on tiny models, seconds on a busy CPU pair); a token's latency
# spans one engine step of the whole batch.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative; render() accumulates
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines, total = [], 0
        for upper, n in zip(self.buckets, self.counts):
            total += n
            lines.append(f'{name}_bucket{{le="{upper:g}"}} {total}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


class ServerMetrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: Counter[tuple[str, int]] = Counter()  # (path, HTTP status)
        self.finished: Counter[str] = Counter()  # stop | length | cancelled | error
        self.tokens: Counter[Role] = Counter()
        self.prompt_tokens = 0
        self.switches = 0
        self.engine_errors = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.token_latency = Histogram(TOKEN_BUCKETS_S)
        self.queue_depth = 0  # set by the engine thread after each round
        self.running = 0

    def record_response(self, path: str, status: int) -> None:
        with self.lock:
            self.responses[(path, status)] += 1

    def record_token(self, role: Role, ttft_s: float | None, gap_s: float | None) -> None:
        """One generated token; `ttft_s` for a request's first, else `gap_s` since its previous one."""
        with self.lock:
            self.tokens[role] += 1
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if gap_s is not None:
                self.token_latency.observe(gap_s)

    def record_finished(self, reason: str, prompt_tokens: int = 0, switches: int = 0) -> None:
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.switches += switches

    def record_engine_error(self) -> None:
        with self.lock:
            self.engine_errors += 1

    def set_load(self, queue_depth: int, running: int) -> None:
        self.queue_depth, self.running = queue_depth, running  # two int stores; readers tolerate a torn pair

    def render(self) -> str:
        with self.lock:
            small, large = self.tokens[Role.SMALL], self.tokens[Role.LARGE]
            out = [
                "# HELP ead_requests_total Generations that ended, by how: stop, length, cancelled (client left), error.",
                "# TYPE ead_requests_total counter",
                *(f'ead_requests_total{{outcome="{k}"}} {self.finished[k]}'
                  for k in sorted({"stop", "length", "cancelled", "error"} | set(self.finished))),
                "# HELP ead_http_responses_total HTTP responses by path and status code.",
                "# TYPE ead_http_responses_total counter",
                *(f'ead_http_responses_total{{path="{p}",code="{c}"}} {n}'
                  for (p, c), n in sorted(self.responses.items())),
                "# HELP ead_generated_tokens_total Generated tokens by the model that wrote them.",
                "# TYPE ead_generated_tokens_total counter",
                f'ead_generated_tokens_total{{model="small"}} {small}',
                f'ead_generated_tokens_total{{model="large"}} {large}',
                "# HELP ead_large_token_share Share of all generated tokens written by the large model (the paper's f).",
                "# TYPE ead_large_token_share gauge",
                f"ead_large_token_share {large / (small + large) if small + large else 0.0:.6f}",
                "# HELP ead_prompt_tokens_total Prompt tokens of finished requests.",
                "# TYPE ead_prompt_tokens_total counter",
                f"ead_prompt_tokens_total {self.prompt_tokens}",
                "# HELP ead_switches_total Model switches in finished requests.",
                "# TYPE ead_switches_total counter",
                f"ead_switches_total {self.switches}",
                "# HELP ead_engine_errors_total Engine steps that raised; their requests failed with a 500.",
                "# TYPE ead_engine_errors_total counter",
                f"ead_engine_errors_total {self.engine_errors}",
                "# HELP ead_time_to_first_token_seconds From request arrival to its first token.",
                "# TYPE ead_time_to_first_token_seconds histogram",
                *self.ttft.render("ead_time_to_first_token_seconds"),
                "# HELP ead_time_per_output_token_seconds Time between consecutive tokens of one request.",
                "# TYPE ead_time_per_output_token_seconds histogram",
                *self.token_latency.render("ead_time_per_output_token_seconds"),
                "# HELP ead_queue_depth Requests accepted but waiting for a batch slot.",
                "# TYPE ead_queue_depth gauge",
                f"ead_queue_depth {self.queue_depth}",
                "# HELP ead_running_requests Requests in the running batch.",
                "# TYPE ead_running_requests gauge",
                f"ead_running_requests {self.running}",
            ]
        return "\n".join(out) + "\n"
