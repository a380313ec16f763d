"""The OpenAI-compatible HTTP app over any AsyncEngine (engine/protocol.py): /health, /v1/models,
/v1/completions, /v1/chat/completions, streaming or not.

No global lock: every request iterates its own engine stream, so concurrency is the engine's continuous
batching. Everything a client can get wrong is answered with an OpenAI-style 4xx `{"error": {...}}` before any
compute is spent; a request whose client goes away is aborted in the engine at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.protocol import AsyncEngine
from ..errors import LongcpmError, RequestError
from .schema import APIError, ParsedRequest, parse_request, sampling_error, with_max_tokens
from .sse import ClientGone, EventStream, until_disconnect
from .streaming import Job, close_request, next_delta, stream_events

log = logging.getLogger("longcpm.server")

# MiniCPM4's generation_config.json: do_sample true, temperature 0.8, top_p 0.8 (spec serving §2.1)
MINICPM4_DEFAULTS = {"temperature": 0.8, "top_p": 0.8}
MAX_BODY_BYTES = 32 << 20


def generation_defaults(gen_config: dict) -> dict:
    """generation_config.json -> request defaults for omitted sampling fields (do_sample false = greedy)."""
    if gen_config.get("do_sample") is False:
        return {"temperature": 0.0}
    out = {k: gen_config[k] for k in ("temperature", "top_p", "min_p") if isinstance(gen_config.get(k), (int, float))}
    if isinstance(gen_config.get("top_k"), int):
        out["top_k"] = gen_config["top_k"]
    return out


class _API:
    def __init__(self, engine: AsyncEngine, api_key: str | None, name: str, defaults: dict, max_body_bytes: int):
        self.engine, self.api_key, self.name = engine, api_key, name
        self.defaults, self.max_body_bytes = defaults, max_body_bytes
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        log.info("serving model %r (max_model_len %d)", self.name, self.engine.max_model_len)
        yield
        # uvicorn gets here after it stopped accepting and in-flight requests finished (or were cancelled)
        log.info("shutting down the engine")
        await self.engine.shutdown(drain=True)

    async def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def health(self) -> dict:
        return {"status": "ok"}

    def _card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "longcpm",
                "max_model_len": self.engine.max_model_len}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict:
        if model_id != self.name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return self._card()

    async def chat(self, request: Request):
        return await self._handle(request, chat=True)

    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    async def _body(self, request: Request) -> Any:
        mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if mime and mime != "application/json" and not mime.endswith("+json"):
            raise APIError(415, f"Unsupported Content-Type {mime!r}: send application/json.",
                           code="unsupported_media_type")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body_bytes:
                raise APIError(413, f"Request body larger than {self.max_body_bytes} bytes.", code="body_too_large")
        try:
            return json.loads(bytes(data))
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"Invalid JSON body: {e}", code="invalid_json") from None

    def _encode(self, req: ParsedRequest) -> list[int]:
        if req.chat:
            return self.engine.encode_prompt("", chat=req.messages)
        return self.engine.encode_prompt(req.prompt)

    def _fit(self, req: ParsedRequest, n_prompt: int):
        """Pick max_tokens and refuse what cannot fit the context: chat defaults to the rest of the context,
        completions to 16 (OpenAI's default)."""
        limit, where = self.engine.max_model_len, "messages" if req.chat else "prompt"
        if n_prompt >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{n_prompt} tokens, leaving no room for the completion.", param=where,
                           code="context_length_exceeded")
        if req.max_tokens is None:
            return with_max_tokens(req.params, limit - n_prompt if req.chat else min(16, limit - n_prompt))
        if n_prompt + req.max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the prompt, {req.max_tokens} for "
                                f"the completion). Reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        return with_max_tokens(req.params, req.max_tokens)

    @staticmethod
    async def _collect(job: Job, agen) -> None:
        while not job.finished:
            job.on_delta(await next_delta(agen))

    async def _handle(self, request: Request, chat: bool):
        job = Job(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, chat, self.name)
        agen, handed_over = None, False
        try:
            req = parse_request(await self._body(request), chat=chat, defaults=self.defaults)
            job.req = req
            if req.model is not None and req.model != self.name:
                raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.name}'.",
                               param="model", code="model_not_found")
            ids = await asyncio.to_thread(self._encode, req)
            job.prompt_tokens = len(ids)
            params = self._fit(req, len(ids))
            agen = self.engine.generate(ids, params, job.rid)
            first = await until_disconnect(request.receive, next_delta(agen))
            job.on_delta(first)
            headers = {"x-request-id": job.rid}
            if req.stream:
                handed_over = True
                return EventStream(stream_events(job, first, agen, self.engine), headers=headers)
            await until_disconnect(request.receive, self._collect(job, agen))
            if job.finish_reason == "abort":
                raise APIError(503, "The request was aborted before it finished (server shutting down?).",
                               type="server_error", code="aborted")
            return JSONResponse(job.response(), headers=headers)
        except (ClientGone, ClientDisconnect):
            job.status, job.error = 499, "client disconnected"
            return JSONResponse({}, status_code=499)
        except APIError as e:
            return job.fail(e)
        except LongcpmError as e:  # RequestError from the engine (too long, bad ids), TokenizerError (template)
            return job.fail(sampling_error(e) if isinstance(e, RequestError) else APIError(400, str(e)))
        except Exception as e:
            log.exception("%s failed", job.rid)
            return job.fail(APIError(500, f"Internal server error ({type(e).__name__}).", type="server_error"))
        finally:
            if not handed_over:  # a streaming response cleans up and logs in its own generator
                if agen is not None:
                    await close_request(self.engine, job, agen)
                job.log()


def _error_response(status: int, message: str, type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(APIError(status, message, type=type).body(), status_code=status)


def create_app(engine: AsyncEngine, *, api_key: str | None = None, served_model_name: str | None = None,
               generation_config: dict | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app for one engine. generation_config (a generation_config.json dict) sets the sampling defaults for
    omitted fields; None means MiniCPM4's (temperature 0.8, top_p 0.8). The app's shutdown shuts the engine."""
    defaults = MINICPM4_DEFAULTS if generation_config is None else generation_defaults(generation_config)
    api = _API(engine, api_key, served_model_name or engine.model_name, defaults, max_body_bytes)
    app = FastAPI(title="longcpm", lifespan=api.lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(e.status_code, f"{e.detail}: {request.method} {request.url.path}")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return _error_response(500, f"Internal server error ({type(e).__name__}).", type="server_error")

    auth = [Depends(api.check_key)]
    app.get("/health")(api.health)
    app.get("/v1/models", dependencies=auth)(api.models)
    app.get("/v1/models/{model_id:path}", dependencies=auth)(api.model)
    app.post("/v1/completions", dependencies=auth)(api.completions)
    app.post("/v1/chat/completions", dependencies=auth)(api.chat)
    app.state.api = api
    return app


__all__ = ["create_app", "generation_defaults"]
