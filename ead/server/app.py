"""Routes only: the OpenAI-compatible endpoints on Starlette, and what every request goes through on its way to
the engine thread (auth, body limit, JSON, validation, admission or 429) and back (JSON or server-sent events).

    POST /v1/completions        POST /v1/chat/completions        GET /v1/models
    GET /health                 GET /metrics (Prometheus text)

One request's life: the handler validates the body (ead.server.protocol), hands a Submission to the engine
thread (ead.server.worker) and awaits its events on an asyncio.Queue that the engine thread fills through
call_soon_threadsafe. While it waits it also watches the connection, so a client that leaves mid-stream has
its generation cancelled and its batch slot freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ead.config import EngineConfig, RouterConfig, SpeculativeConfig
from ead.engine import BatchEngine
from ead.errors import ConfigError
from ead.pair import ModelPair
from ead.server.prometheus import ServerMetrics
from ead.server.protocol import (APIError, CompletionRequest, chunk_body, ead_summary, error_for, parse_request,
                                 response_body, tau_json, usage_chunk_body)
from ead.server.worker import Admitted, EngineWorker, Event, Failed, Submission, Tokens

log = logging.getLogger("ead.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a context, far less than RAM
DRAIN_LIMIT_BYTES = 64 << 20  # an oversized body is read (and dropped) up to here so the client sees the 413
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeConfig:
    """Server-wide settings; the rule's defaults for requests without an `ead` object are `router`."""

    model_name: str = "ead"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    router: RouterConfig = field(default_factory=RouterConfig)


def build_app(worker: EngineWorker, metrics: ServerMetrics, cfg: ServeConfig) -> Starlette:
    """The ASGI app. It starts the engine thread when the server starts and stops it when the server stops."""
    started = int(time.time())

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def complete(request: Request, chat: bool) -> Response:
        arrived_s = time.perf_counter()
        body = await read_json(request, cfg.max_body_bytes)
        req = parse_request(body, chat, cfg.model_name, cfg.router)
        exchange = Exchange(worker, request, req, arrived_s)
        if not worker.try_submit(exchange.sub):
            exchange.finished = True  # never submitted: nothing to cancel
            exchange.close()
            raise APIError(429, f"the server is full: {worker.capacity} requests are running or queued "
                                f"(--max-batch plus --max-queue); retry in {RETRY_AFTER_S} s",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            first = await exchange.next()  # admitted, or refused by the engine's checks (a too-long prompt)
        except BaseException:
            exchange.close()
            raise
        if not isinstance(first, Admitted):
            exchange.close()
            if isinstance(first, Failed):
                raise first.error
            return Response(status_code=499)  # the client left before its request was admitted
        if req.stream:
            return EventStream(stream(exchange, first.prompt_tokens), on_close=exchange.close)
        try:
            return await collect(exchange, first.prompt_tokens)
        finally:
            exchange.close()

    async def collect(exchange: Exchange, prompt_tokens: int) -> Response:
        while True:
            event = await exchange.next()
            if event is None:
                return Response(status_code=499)  # nobody is listening; the generation was cancelled
            if isinstance(event, Failed):
                raise event.error
            if event.result is not None:
                return JSONResponse(response_body(exchange.req, exchange.rid, exchange.created, prompt_tokens,
                                                  event.result))

    async def stream(exchange: Exchange, prompt_tokens: int) -> AsyncIterator[bytes]:
        req, rid, created = exchange.req, exchange.rid, exchange.created
        try:
            if req.chat:  # OpenAI opens a chat stream with the assistant role and no text
                yield sse(chunk_body(req, rid, created, first=True))
            while True:
                event = await exchange.next()
                if event is None:
                    return  # the client left: close() cancels the generation
                if isinstance(event, Failed):
                    yield sse(event.error.body())  # OpenAI's clients raise this as an APIError
                    break
                if event.text:
                    yield sse(chunk_body(req, rid, created, text=event.text))
                if event.result is not None:
                    last = chunk_body(req, rid, created, finish_reason=event.result.finish_reason)
                    last["ead"] = ead_summary(event.result, req.router)
                    yield sse(last)
                    if req.include_usage:
                        yield sse(usage_chunk_body(req, rid, created, prompt_tokens, event.result))
                    break
            yield b"data: [DONE]\n\n"
        finally:
            exchange.close()

    async def models(request: Request) -> Response:
        pair = worker.pair
        return JSONResponse({"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": started, "owned_by": "ead",
            "ead": {"small": pair.small.source, "large": pair.large.source, "max_model_len": worker.max_seq_tokens,
                    "tau": tau_json(cfg.router.threshold_bits), "window": cfg.router.window_tokens,
                    "d_min": cfg.router.min_dwell_tokens}}]})

    async def health(request: Request) -> Response:
        if not worker.thread.is_alive():
            raise APIError(503, "the engine thread is not running", type="server_error", code="engine_down")
        return JSONResponse({"status": "ok", "running": metrics.running, "waiting": metrics.queue_depth})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def endpoint(fn: Callable[[Request], Awaitable[Response]], auth: bool) -> Callable[[Request], Awaitable[Response]]:
        """Auth, errors in OpenAI's shape, and the response counter, around one route."""
        async def handle(request: Request) -> Response:
            try:
                if auth:
                    check_api_key(request, cfg.api_key)
                response = await fn(request)
            except Exception as e:  # a bad request never takes the server down
                error = error_for(e)
                if error.status >= 500:
                    log.exception("request to %s failed", request.url.path)
                response = error_response(error)
            metrics.record_response(request.url.path, response.status_code)
            return response
        return handle

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = {404: f"no route {request.url.path}; see /v1/models, /v1/completions, /v1/chat/completions",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(status, str(exc))
        return error_response(APIError(status, message, code="not_found" if status == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    routes = [Route("/v1/completions", endpoint(completions, auth=True), methods=["POST"]),
              Route("/v1/chat/completions", endpoint(chat_completions, auth=True), methods=["POST"]),
              Route("/v1/models", endpoint(models, auth=True), methods=["GET"]),
              Route("/health", endpoint(health, auth=False), methods=["GET"]),
              Route("/metrics", endpoint(prometheus, auth=False), methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


class Exchange:
    """One request between the event loop and the engine thread: its Submission, the queue its events arrive
    on, and a watch on its connection."""

    def __init__(self, worker: EngineWorker, request: Request, req: CompletionRequest, arrived_s: float) -> None:
        self.worker, self.req = worker, req
        self.rid = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(event: Event) -> None:  # runs on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.sub = Submission(request=req, deliver=deliver, arrived_s=arrived_s)
        self.gone = asyncio.ensure_future(wait_for_disconnect(request))
        self.finished = False

    async def next(self) -> Event | None:
        """The next event from the engine, or None once the client has disconnected."""
        get = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait({get, self.gone}, return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            get.cancel()
            return None
        event = get.result()
        if isinstance(event, Failed) or (isinstance(event, Tokens) and event.result is not None):
            self.finished = True
        return event

    def close(self) -> None:
        """Stop watching the connection; if the generation has not finished, cancel it and free its slot."""
        self.gone.cancel()
        if not self.finished:
            self.finished = True
            self.worker.cancel(self.sub)


class EventStream(Response):
    """A text/event-stream response. If the client goes away the chunk generator notices (Exchange.next) and
    ends; a send that fails on a closed connection ends it as well."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.chunks, self.on_close = chunks, on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.raw_headers.append((b"content-type", b"text/event-stream; charset=utf-8"))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection closed under us (uvicorn's ClientDisconnected)
            pass
        finally:
            await self.chunks.aclose()
            self.on_close()  # in case the generator never started, so its own cleanup never ran


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects. Called only after the body has been read, so every message left on
    the ASGI channel is a disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json(request: Request, limit_bytes: int) -> object:
    """The body as JSON, refused with 413 past `limit_bytes` and with 400 when it is not JSON."""
    too_big = APIError(413, f"the request body is larger than {limit_bytes} bytes (--max-body-bytes)",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    size, parts = 0, []
    try:
        async for part in request.stream():
            size += len(part)
            if size > DRAIN_LIMIT_BYTES:
                break
            if size <= limit_bytes and not (declared.isdigit() and int(declared) > limit_bytes):
                parts.append(part)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    if size > limit_bytes or (declared.isdigit() and int(declared) > limit_bytes):
        raise too_big
    try:
        return json.loads(b"".join(parts))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def check_api_key(request: Request, api_key: str | None) -> None:
    """Bearer auth in constant time, so the comparison's duration says nothing about the key."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>' with the key the server "
                            "was started with (--api-key)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(pair: ModelPair, cfg: ServeConfig, engine_cfg: EngineConfig | None = None, max_batch: int = 16,
               max_queue: int = 64, mode: str = "ead", speculative: SpeculativeConfig | None = None,
               mirror: Callable[[list[tuple]], None] | None = None, schedule: str = "exact") -> Starlette:
    """The whole server for one loaded pair: a BatchEngine of `max_batch` slots on its own thread, at most
    `max_queue` more requests waiting, the routes. `mode` ("ead", "speculative" or "hybrid") and `schedule`
    ("exact" or "throughput", see BatchEngine) are the engine's, the same for every request. `mirror`: rank 0 of
    a tensor-parallel pair sends each round's commands to the other ranks through it (ead.server.worker.follow).
    `app.state` holds `worker` and `metrics` for inspection."""
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    metrics = ServerMetrics()
    worker = EngineWorker(pair, engine_factory(pair, cfg, engine_cfg, max_batch, mode, speculative, schedule),
                          metrics, capacity=max_batch + max_queue, mirror=mirror)
    app = build_app(worker, metrics, cfg)
    app.state.worker, app.state.metrics = worker, metrics
    return app


def engine_factory(pair: ModelPair, cfg: ServeConfig, engine_cfg: EngineConfig | None, max_batch: int, mode: str,
                   speculative: SpeculativeConfig | None, schedule: str = "exact") -> Callable[[], BatchEngine]:
    """How the server builds its engine (again after a failure); every rank of a tensor-parallel server alike."""
    return lambda: BatchEngine(pair, cfg.router, engine_cfg, max_batch=max_batch, mode=mode, speculative=speculative,
                               schedule=schedule)
