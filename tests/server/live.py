"""A live ead server on 127.0.0.1 for the tests: the real app, the real engine on tiny models, uvicorn on a free
port in a background thread; clients talk to it over loopback HTTP like any other client."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn

import ead
from ead.server.app import ServeConfig, create_app


class LiveServer:
    def __init__(self, pair: ead.ModelPair, cfg: ServeConfig, max_batch: int, max_queue: int, **app_kwargs) -> None:
        self.app = create_app(pair, cfg, max_batch=max_batch, max_queue=max_queue, **app_kwargs)
        self.worker, self.metrics = self.app.state.worker, self.app.state.metrics
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout_s: float = 30) -> tuple[int, dict, bytes]:
    """A raw request (for what the openai client will not send: bad JSON, no key, huge bodies)."""
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metric(text: str, name: str) -> float:
    """One sample's value from Prometheus text, by its full name with labels."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def error_of(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err
