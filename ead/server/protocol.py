"""The OpenAI wire format: request bodies in, validated `CompletionRequest` out; results and stream chunks back
out as the dicts OpenAI's clients expect; every error as `{"error": {message, type, param, code}}`.

Plain dicts and hand-written checks, so each message can name the field, the value and the fix. Nothing here
touches the engine, the tokenizer or the event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ead.config import RouterConfig
from ead.errors import CacheCapacityError, ConfigError, EADError, RequestError
from ead.metrics import GenerateResult
from ead.sampling import SamplingParams

# OpenAI's legacy completions default; chat completions default to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An HTTP error in OpenAI's shape. `headers` carries e.g. Retry-After for a 429."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_for(exc: BaseException) -> APIError:
    """The one place that maps an exception to an HTTP status: a failed request is 4xx, anything ead did not
    raise on purpose is a 500 (the server keeps serving either way)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, CacheCapacityError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (RequestError, ConfigError)):
        return APIError(400, str(exc))
    if isinstance(exc, EADError):
        return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="engine_error")
    return APIError(500, f"the engine failed on this request ({type(exc).__name__}: {exc}); it keeps serving "
                         "others, so retry, and report this if it repeats", type="server_error", code="engine_error")


@dataclass(frozen=True)
class CompletionRequest:
    """One validated body of /v1/completions (chat False) or /v1/chat/completions (chat True).

    `prompt` is text, token ids or chat messages; `max_tokens` None means the rest of the context (chat) and is
    resolved by the engine thread once the prompt is tokenized.
    """

    chat: bool
    model: str
    prompt: str | list[int] | list[dict]
    sampling: SamplingParams
    max_tokens: int | None
    router: RouterConfig
    stream: bool
    include_usage: bool


# Fields OpenAI defines that EAD does not implement: refused unless they carry their "off" value, so a client
# never silently gets something other than what it asked for.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}
EAD_FIELDS = {"tau": "threshold_bits", "window": "window_tokens", "d_min": "min_dwell_tokens", "start": "start"}


def parse_request(body: object, chat: bool, model_name: str, router_defaults: RouterConfig) -> CompletionRequest:
    """Validate a decoded JSON body. Raises APIError 400 naming the field, or 404 for another model's name."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {model!r}", param="model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise APIError(400, f"'{name}' is not supported by ead serve (got {body[name]!r}); leave it out",
                           param=name, code="unsupported_parameter")
    n = body.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise APIError(400, f"'n' must be 1 (one completion per request), got {n!r}; send {n!r} requests with "
                            "different seeds instead", param="n")
    prompt = _messages(body.get("messages")) if chat else _prompt(body.get("prompt"))
    max_tokens = _max_tokens(body, chat)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise APIError(400, "'stream_options' is only allowed with 'stream': true, as an object like "
                            "{\"include_usage\": true}", param="stream_options")
    include_usage = _bool(options or {}, "include_usage", False, prefix="stream_options.")
    return CompletionRequest(chat=chat, model=model, prompt=prompt, sampling=_sampling(body, max_tokens),
                             max_tokens=max_tokens, router=_router(body.get("ead"), router_defaults),
                             stream=stream, include_usage=include_usage)


def _prompt(prompt: object) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return prompt  # token ids, used as given
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, f"'prompt' holds {len(prompt)} prompts; send one prompt per request", param="prompt")
    raise APIError(400, f"'prompt' must be a non-empty string or a list of token ids, got {prompt!r:.80}",
                   param="prompt")


def _messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text parts can be rendered
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    "are supported", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must be an object with string 'role' and 'content', got {m!r:.80}",
                           param=f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"] for m in out):
        raise APIError(400, "every message in 'messages' is empty; give some text", param="messages")
    return out


def _max_tokens(body: dict, chat: bool) -> int | None:
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None if chat else DEFAULT_COMPLETION_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError(400, f"'{name}' must be an integer >= 1, got {value!r}", param=name)
    return value


def _sampling(body: dict, max_tokens: int | None) -> SamplingParams:
    """SamplingParams from the OpenAI fields, plus vLLM's `top_k` and `ignore_eos` extras. Greedy by default,
    like `ead generate`: send a temperature to sample."""
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "'top_p' must be in (0, 1], got 0; use temperature 0 for greedy decoding", param="top_p")
    top_k = body.get("top_k", 0) or 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise APIError(400, f"'top_k' must be an integer >= 0 (0 = off), got {top_k!r}", param="top_k")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS}, got "
                            f"{body.get('stop')!r:.80}", param="stop")
    try:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              max_new_tokens=max_tokens or 1, stop=tuple(stop),
                              ignore_eos=_bool(body, "ignore_eos", False))
    except ConfigError as e:  # a combination the field checks above let through
        raise APIError(400, str(e)) from None


def _router(settings: object, defaults: RouterConfig) -> RouterConfig:
    """The per-request `ead` object ({"tau", "window", "d_min", "start"}) over the server's rule. JSON has no
    infinity, so tau also takes the strings "inf" and "-inf"."""
    if settings is None:
        return defaults
    if not isinstance(settings, dict):
        raise APIError(400, f"'ead' must be an object like {{\"tau\": 0.5, \"window\": 5, \"d_min\": 10}}, "
                            f"got {settings!r:.80}", param="ead")
    unknown = sorted(set(settings) - set(EAD_FIELDS))
    if unknown:
        raise APIError(400, f"unknown field(s) in 'ead': {', '.join(unknown)}; known: {', '.join(EAD_FIELDS)}",
                       param=f"ead.{unknown[0]}")
    values = {f: getattr(defaults, f) for f in EAD_FIELDS.values()}
    for name, field in EAD_FIELDS.items():
        if name in settings:
            value = settings[name]
            if name == "tau" and value in ("inf", "+inf", "-inf", "Infinity", "-Infinity"):
                value = float(value.replace("Infinity", "inf"))
            if name == "tau" and isinstance(value, str):
                raise APIError(400, f"'ead.tau' must be a number of bits or \"inf\"/\"-inf\", got {value!r}",
                               param="ead.tau")
            values[field] = value
    try:
        return RouterConfig(**values)
    except ConfigError as e:
        bad = next((n for n in EAD_FIELDS if n in settings and n in str(e)), "tau")
        raise APIError(400, f"'ead.{bad}': {e}", param=f"ead.{bad}") from None


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be a number in [{lo:g}, {hi:g}], got {value!r}", param=name)
    return float(value)


def _bool(body: dict, name: str, default: bool, prefix: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{prefix}{name}' must be true or false, got {value!r}", param=prefix + name)
    return value


# --- responses ---------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, result: GenerateResult) -> dict:
    n = len(result.token_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def ead_summary(result: GenerateResult, router: RouterConfig) -> dict:
    """The `ead` object of a response: who wrote how much, under which rule (numbers from ead.metrics)."""
    s = result.stats
    return {"tokens_small": s.tokens_small, "tokens_large": s.tokens_large, "large_share": s.large_share,
            "switches": s.switches, "catchup_tokens": s.catchup_tokens, "cost_ratio": s.cost_ratio,
            "tau": tau_json(router.threshold_bits), "window": router.window_tokens,
            "d_min": router.min_dwell_tokens}


def tau_json(tau: float) -> float | str:
    """JSON has no infinity: +-inf goes out as the strings "inf" / "-inf", which requests accept too."""
    return tau if math.isfinite(tau) else str(tau)


def response_body(req: CompletionRequest, rid: str, created: int, prompt_tokens: int,
                  result: GenerateResult) -> dict:
    """A whole (non-streamed) completion or chat completion."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [choice], "usage": usage(prompt_tokens, result),
            "ead": ead_summary(result, req.router)}


def chunk_body(req: CompletionRequest, rid: str, created: int, text: str | None = None, first: bool = False,
               finish_reason: str | None = None) -> dict:
    """One streamed chunk: new text, or (with `finish_reason`) the last choice chunk."""
    if req.chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    body = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [choice]}
    if req.include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def usage_chunk_body(req: CompletionRequest, rid: str, created: int, prompt_tokens: int,
                     result: GenerateResult) -> dict:
    """The chunk `stream_options.include_usage` asks for: no choices, the usage of the whole request."""
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [], "usage": usage(prompt_tokens, result),
            "ead": ead_summary(result, req.router)}
