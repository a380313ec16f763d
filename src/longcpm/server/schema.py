"""OpenAI request bodies -> validated values the engine can run.

Hand-written checks rather than pydantic models, so that every rejection names the OpenAI field (`param`) and
nothing is silently coerced ("5" is not 5, true is not 1). Unknown fields are ignored, as vLLM does, because
clients send many optional extras; fields we cannot honour (n > 1, logprobs, penalties, tools) are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..engine.sampling_params import SamplingParams
from ..errors import RequestError

ROLES = {"system", "user", "assistant", "tool", "developer"}
MAX_STOP = 16  # stop strings are matched on every step; OpenAI itself allows 4
MAX_ID = 2**31 - 1  # token ids / top_k beyond int32 are nonsense and would overflow tensors


class APIError(Exception):
    """An error the client caused (or a server fault), rendered as the OpenAI `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """One validated request. Exactly one of prompt / messages is set; max_tokens None means "the default"."""

    chat: bool
    model: str | None
    params: SamplingParams
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    echo: bool = False


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _bad_type(name: str, want: str, v: Any) -> APIError:
    return APIError(400, f"Invalid type for '{name}': expected {want}, but got {_kind(v)} instead.", param=name,
                    code="invalid_type")


def _bad_value(name: str, msg: str) -> APIError:
    return APIError(400, f"Invalid value for '{name}': {msg}", param=name, code="invalid_value")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is not None and not _is_int(v):
        raise _bad_type(name, "an integer", v)
    return v


def _num(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _bad_type(name, "a number", v)
    if not math.isfinite(v):
        raise _bad_value(name, "must be a finite number.")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad_type(name, "a boolean", v)
    return v


def _refuse_unsupported(body: dict) -> None:
    """Fields whose non-default values we cannot honour: refusing beats silently returning something else."""
    n = _int(body, "n")
    if n is not None and n != 1:
        raise _bad_value("n", f"only n=1 is supported, got {n}.")
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise _bad_value("best_of", f"only best_of=1 is supported, got {best_of}.")
    for name, default in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1)):
        v = _num(body, name)
        if v is not None and v != default:
            raise _bad_value(name, f"is not supported by this server (only {default}).")
    for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix"):
        if body.get(name) not in (None, False, 0, [], {}, ""):
            raise _bad_value(name, "is not supported by this server.")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad_value("response_format", "only {'type': 'text'} is supported.")


def _sampling(body: dict, defaults: dict) -> SamplingParams:
    kw: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p"):
        v = _num(body, name)
        kw[name] = defaults[name] if v is None and name in defaults else v
    kw["top_k"] = _int(body, "top_k")
    if kw["top_k"] is not None and kw["top_k"] > MAX_ID:
        raise _bad_value("top_k", f"must be at most {MAX_ID}.")
    if kw["top_k"] is None and "top_k" in defaults:
        kw["top_k"] = defaults["top_k"]
    kw["seed"] = _int(body, "seed")
    if kw["seed"] is not None and not -(2**63) <= kw["seed"] < 2**64:
        raise _bad_value("seed", "must fit in 64 bits.")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) for s in stop))):
        raise _bad_type("stop", "a string or an array of strings", stop)
    kw["stop"] = [stop] if isinstance(stop, str) else stop
    if kw["stop"] is not None and len(kw["stop"]) > MAX_STOP:
        raise _bad_value("stop", f"at most {MAX_STOP} stop strings are supported, got {len(kw['stop'])}.")
    ids = body.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(_is_int(i) for i in ids)):
        raise _bad_type("stop_token_ids", "an array of integers", ids)
    if ids and not all(0 <= i <= MAX_ID for i in ids):
        raise _bad_value("stop_token_ids", "token ids must be in [0, 2**31).")
    kw["stop_token_ids"] = ids
    kw["ignore_eos"] = _bool(body, "ignore_eos")
    kw["skip_special_tokens"] = _bool(body, "skip_special_tokens", True)
    _bool(body, "add_special_tokens")  # accepted for vLLM/MiniCPM clients; BOS is always added exactly once
    try:
        return SamplingParams(**{k: v for k, v in kw.items() if v is not None})
    except RequestError as e:
        raise sampling_error(e) from None


def sampling_error(e: RequestError) -> APIError:
    """SamplingParams says "SamplingParams.<field>: <why>"; turn that into a 400 naming the field."""
    m = re.match(r"SamplingParams\.(\w+): (.*)", str(e), re.S)
    return _bad_value(m.group(1), m.group(2)) if m else APIError(400, str(e))


def _max_tokens(body: dict) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = _int(body, name)
    if v is not None and v < 1:
        raise _bad_value(name, f"must be at least 1, got {v}.")
    return v


def _content(content: Any, where: str) -> str:
    """A message's content: a string or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad_value(f"{where}[{k}]", "only text content parts ({'type': 'text', 'text': ...}) "
                                                  "are supported.")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad_type(where, "a string or an array of text parts", content)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list):
        raise _bad_type("messages", "an array", msgs)
    if not msgs:
        raise _bad_value("messages", "must contain at least one message.")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad_type(where, "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise _bad_type(f"{where}.role", "a string", role)
        if role not in ROLES:
            raise _bad_value(f"{where}.role", f"must be one of {sorted(ROLES)}, got {role!r}.")
        # MiniCPM4 knows no "developer" role; it is OpenAI's new name for the system message
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), f"{where}.content")})
    return out


def _prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if p is None:
        raise APIError(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise _bad_value("prompt", f"batched prompts are not supported (got {len(p)}); send one prompt per request.")
    if not isinstance(p, list) or not all(_is_int(i) for i in p):
        raise _bad_type("prompt", "a string or an array of token ids", p)
    if not p:
        raise _bad_value("prompt", "must not be empty.")
    if not all(0 <= i <= MAX_ID for i in p):
        raise _bad_value("prompt", "token ids must be in [0, 2**31).")
    return p


def parse_request(body: Any, *, chat: bool, defaults: dict) -> ParsedRequest:
    """Validate a /v1/chat/completions (chat=True) or /v1/completions body; raises APIError (400)."""
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {_kind(body)}.")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    _refuse_unsupported(body)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad_type("stream_options", "an object", opts)
    req = ParsedRequest(chat=chat, model=model, params=_sampling(body, defaults), max_tokens=_max_tokens(body),
                        stream=_bool(body, "stream"), include_usage=_bool(opts or {}, "include_usage"))
    if chat:
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
        req.echo = _bool(body, "echo")
        if req.echo and not isinstance(req.prompt, str):
            raise _bad_value("echo", "is only supported with a text prompt.")
    return req


def with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=max_tokens)
