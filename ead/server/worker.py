"""The engine thread: the only thread that touches the BatchEngine, the tokenizer and the sequences.

The event loop hands requests in through `try_submit` and `cancel` (one FIFO inbox). Between two engine steps
the thread drains the inbox, so a new request joins the running batch at the next step (continuous batching)
and a cancelled one frees its slot before it. Each request's events go back through its own `deliver`
callback, which the HTTP side makes thread-safe (asyncio's call_soon_threadsafe into the request's queue).

Prompts are tokenized here as well: the engine decodes text on this thread inside step(), and a Hugging Face
fast tokenizer used from two threads at once can fail ("Already borrowed").

Under tensor parallelism (ead.launch) every rank runs an engine over the same requests, and only rank 0 serves
HTTP: each round its worker sends the other ranks what changed (`mirror`: sequences added, cancelled, the engine
replaced, the server stopping) before it steps, and each of them replays that in `follow` and steps too.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ead.engine import BatchEngine, Sequence
from ead.errors import CacheCapacityError
from ead.metrics import GenerateResult
from ead.pair import ModelPair
from ead.router import Router
from ead.sampling import SamplingParams
from ead.server.prometheus import ServerMetrics
from ead.server.protocol import APIError, CompletionRequest, error_for

log = logging.getLogger("ead.server")


@dataclass(frozen=True)
class Admitted:
    """The request passed the engine's checks and waits for (or has) a batch slot."""

    prompt_tokens: int


@dataclass(frozen=True)
class Tokens:
    """New text that will not change (stop strings held back); `result` is set on the request's last event."""

    text: str
    result: GenerateResult | None = None


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Admitted | Tokens | Failed


@dataclass(eq=False)
class Submission:
    """One request's state on the engine side. Only the engine thread writes it after `try_submit`."""

    request: CompletionRequest
    deliver: Callable[[Event], None]  # thread-safe, never blocks
    arrived_s: float  # time.perf_counter() when the HTTP request arrived
    seq: Sequence | None = None  # once admitted
    key: int = -1  # once admitted: the name other ranks know its sequence by (tensor parallelism)
    prompt_tokens: int = 0
    shown_chars: int = 0
    last_token_s: float | None = None
    done: bool = False


class EngineWorker:
    """Owns the engine on one thread. `capacity` bounds requests in the server (running + queued): a submit
    past it is refused at once, so the HTTP side can answer 429 instead of queueing without end."""

    def __init__(self, pair: ModelPair, make_engine: Callable[[], BatchEngine], metrics: ServerMetrics,
                 capacity: int, mirror: Callable[[list[tuple]], None] | None = None) -> None:
        """`mirror`, for a tensor-parallel pair: sends each round's commands (see `follow`) to the other ranks."""
        self.pair = pair
        self.make_engine = make_engine
        self.engine = make_engine()
        self.metrics = metrics
        self.vocab_size = min(r.vocab_size for r in self.engine.runners.values())
        self.mirror, self.keys, self.mirrored = mirror, 0, []  # this round's commands for the other ranks
        self.capacity = capacity
        self.slots = threading.BoundedSemaphore(capacity)
        self.inbox: queue.SimpleQueue[tuple[str, Submission | None]] = queue.SimpleQueue()
        self.active: dict[Sequence, Submission] = {}  # Sequence hashes by identity
        self.thread = threading.Thread(target=self.run, name="ead-engine", daemon=True)

    @property
    def max_seq_tokens(self) -> int:
        return self.engine.max_seq_tokens

    # --- called from the event loop ---

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.inbox.put(("stop", None))
        self.thread.join(timeout_s)

    def try_submit(self, sub: Submission) -> bool:
        if not self.slots.acquire(blocking=False):
            return False
        self.inbox.put(("add", sub))
        return True

    def cancel(self, sub: Submission) -> None:
        """The client went away: stop its generation and free its slot (a no-op once it has finished)."""
        self.inbox.put(("cancel", sub))

    # --- the engine thread ---

    def run(self) -> None:
        if self.pair.device.type == "cuda":  # a thread starts on cuda:0; collectives run on this rank's GPU
            torch.cuda.set_device(self.pair.device)
        while True:
            try:
                if not self._round():
                    return
            except Exception as e:  # a step or a result raised (admit and cancel never do): fail what was in flight
                self._fail_all(e)

    def _round(self) -> bool:
        """Take what arrived in the inbox, then step the engine once. False once told to stop."""
        # Block only when idle; with work in flight, take what arrived and step again.
        commands = [self.inbox.get()] if not self.engine.has_work else []
        while True:
            try:
                commands.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for kind, sub in commands:
            if kind == "stop":
                self._send(("stop",))
                self._shut_down()
                return False
            self._admit(sub) if kind == "add" else self._cancel(sub)
        self._send()
        if self.engine.has_work:
            self._step()
        self.metrics.set_load(self.engine.waiting, self.engine.running)
        return True

    def _admit(self, sub: Submission) -> None:
        req = sub.request
        try:
            ids = list(req.prompt) if _is_token_ids(req.prompt) else self.pair.encode(req.prompt)
            sampling = self._fit(req, ids)
            sub.prompt_tokens = len(ids)
            sub.seq = self.engine.add(ids, sampling, Router(req.router))  # per-request rule
            sub.key, self.keys = self.keys, self.keys + 1
            self.mirrored.append(("add", sub.key, ids, sampling, req.router))
        except Exception as e:  # a bad prompt fails this request only
            error = error_for(e)
            if error.status >= 500:
                log.exception("admitting a request failed")
            sub.deliver(Failed(error))
            self._release(sub)
            return
        self.active[sub.seq] = sub
        sub.deliver(Admitted(prompt_tokens=len(ids)))

    def _fit(self, req: CompletionRequest, ids: list[int]) -> SamplingParams:
        """Check the prompt and max_tokens against the context; None max_tokens becomes the rest of it."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise APIError(400, f"token id {max(ids)} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param="prompt")
        limit, n = self.max_seq_tokens, len(ids)
        if n >= limit:
            raise CacheCapacityError(f"the prompt has {n} tokens but the model's context holds {limit}; "
                                     "shorten the prompt")
        if req.max_tokens is None:
            return replace(req.sampling, max_new_tokens=limit - n)
        if n + req.max_tokens > limit:
            raise APIError(400, f"the prompt has {n} tokens and max_tokens asks for {req.max_tokens} more, but the "
                                f"model's context holds {limit}; ask for at most {limit - n}",
                           param="max_tokens", code="context_length_exceeded")
        return req.sampling

    def _step(self) -> None:
        events = self.engine.step()
        # The engine freed the rows that finished in its step: book that before any result reaches its client (a
        # client that reads /metrics once it has its result must find its row gone).
        self.metrics.set_load(self.engine.waiting, self.engine.running)
        now = time.perf_counter()
        touched: dict[Sequence, Submission] = {}  # in event order
        for seq, record in events:
            sub = self.active.get(seq)
            if sub is None:
                continue
            first = sub.last_token_s is None
            self.metrics.record_token(record.role, now - sub.arrived_s if first else None,
                                      None if first else now - sub.last_token_s)
            sub.last_token_s = now
            touched[seq] = sub
        for sub in touched.values():
            self._emit(sub)

    def _fail_all(self, exc: Exception) -> None:
        """The batch is one computation, so an exception in it fails every request in flight (each gets a
        500-shaped error). The half-done step may have left caches or counters inconsistent, so the engine is
        replaced by a fresh one; if that fails too (out of memory), the old one goes on with its rows cancelled."""
        log.error("engine failed; failing its %d requests", len(self.active), exc_info=exc)
        self.metrics.record_engine_error()
        error = error_for(exc)
        failed = list(self.active.values())
        for sub in failed:
            self.metrics.record_finished("error", sub.prompt_tokens)
            with contextlib.suppress(Exception):  # best effort: the engine is about to be replaced
                self.engine.cancel(sub.seq)
            self._release(sub)
        try:
            self.engine = self.make_engine()
            self.mirrored.append(("reset",))
        except Exception:
            log.exception("could not build a fresh engine; keeping the old one")
        self.metrics.set_load(self.engine.waiting, self.engine.running)
        for sub in failed:  # after the books, as in `_emit`
            sub.deliver(Failed(error))

    def _emit(self, sub: Submission) -> None:
        """Hand over the text that became final; on the last token, the result too, and free the slot."""
        seq = sub.seq
        if seq.finish_reason is None:
            visible = seq.stopper.text[:seq.stopper.visible_chars]
            if len(visible) > sub.shown_chars:
                sub.deliver(Tokens(visible[sub.shown_chars:]))
                sub.shown_chars = len(visible)
            return
        result = self.engine.result(seq)
        self.metrics.record_finished(result.finish_reason, sub.prompt_tokens, result.stats.switches)
        self._release(sub)
        # Last: a client that reads /metrics or sends its next request once it has its result finds the books
        # done and its slot free.
        sub.deliver(Tokens(result.text[sub.shown_chars:], result))

    def _cancel(self, sub: Submission) -> None:
        if sub.done or sub.seq is None:
            return
        try:
            self.engine.cancel(sub.seq)
            self.mirrored.append(("cancel", sub.key))
        except Exception:  # never let one cancel lose the commands queued behind it
            log.exception("cancelling a request failed")
        self.metrics.record_finished("cancelled", sub.prompt_tokens)
        self._release(sub)

    def _release(self, sub: Submission) -> None:
        if sub.done:
            return
        sub.done = True
        self.active.pop(sub.seq, None)
        self.slots.release()

    def _shut_down(self) -> None:
        gone = APIError(503, "the server is shutting down; retry on another instance", type="server_error",
                        code="shutting_down")
        pending = list(self.active.values())
        while True:
            try:
                kind, sub = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                pending.append(sub)
        for sub in pending:
            if not sub.done:
                sub.deliver(Failed(gone))
                self._release(sub)

    def _send(self, *last: tuple) -> None:
        """Hand this round's commands to the other ranks (every round, even none: they step in lockstep)."""
        if self.mirror is not None:
            self.mirror(self.mirrored + list(last))
        self.mirrored = []


def follow(make_engine: Callable[[], BatchEngine], receive: Callable[[], list[tuple]]) -> None:
    """A rank other than 0 of a tensor-parallel server: replay each round's commands from rank 0's worker on an
    engine of its own and step it as rank 0 does, until told to stop. Commands: ("add", key, prompt ids,
    SamplingParams, RouterConfig), ("cancel", key), ("reset",) (rank 0 replaced its engine), ("stop",)."""
    engine, seqs = make_engine(), {}
    while True:
        for command, *fields in receive():
            if command == "stop":
                return
            if command == "add":
                key, ids, sampling, router = fields
                seqs[key] = engine.add(ids, sampling, Router(router))
            elif command == "cancel" and fields[0] in seqs:
                engine.cancel(seqs.pop(fields[0]))
            elif command == "reset":
                engine, seqs = make_engine(), {}
        if engine.has_work:
            try:
                engine.step()
            except Exception:  # rank 0 fails the same step, replaces its engine and says "reset"
                log.exception("engine step failed on this rank")
        seqs = {key: seq for key, seq in seqs.items() if seq.finish_reason is None}


def _is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)
