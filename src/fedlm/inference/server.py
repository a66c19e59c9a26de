"""``fedlm serve``: an OpenAI-compatible HTTP API (FastAPI) over :class:`fedlm.inference.engine.Engine`.

``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` with ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``seed`` and ``stream`` (server-sent events, ``data: {...}`` chunks and ``data: [DONE]``);
``GET /fedlm/stats`` gives the size of every batch the worker ran.
Errors answer in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 401 without the API key (when
one is set), 404 for an unknown model, 400 for a malformed request or a mix the run cannot compute; the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fedlm.core.errors import FedlmError
from fedlm.data.formats import Message
from fedlm.inference.engine import Engine, Job, UnknownModel
from fedlm.inference.generate import Completion, SamplingParams, chat_prompt, context_limit

DEFAULT_MAX_TOKENS = 128


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields fedlm does not use (user, logit_bias: None, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    stream_options: dict[str, Any] | None = None  # {"include_usage": true}: a last chunk with the token counts
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None, "code": code}})


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; with ``api_key``, every request needs ``Authorization: Bearer <key>``."""
    app = FastAPI(title="fedlm", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "invalid or missing API key: send `Authorization: Bearer <key>`", "authentication_error", "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"`{'.'.join(str(p) for p in e['loc'] if p != 'body')}`: {e['msg']}" for e in exc.errors()]
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.code)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(engine.run.root.stat().st_mtime)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "fedlm"} for m in engine.model_ids()]}

    @app.get("/fedlm/stats")
    async def stats() -> dict[str, Any]:
        return {"batches": list(engine.batches), "models": engine.model_ids()}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        messages: list[Message] = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = chat_prompt(engine.run.tokenizer, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _answer(engine, body, prompt, max_tokens, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "`prompt`: one prompt per request (send several requests; they are batched)")
            body.prompt = body.prompt[0]
        prompt = engine.run.tokenizer(body.prompt)["input_ids"]
        return await _answer(engine, body, prompt, body.max_tokens, chat=False)

    return app


async def _answer(engine: Engine, body: _Request, prompt: list[int], max_tokens: int | None, chat: bool) -> dict[str, Any] | StreamingResponse:
    """Queue the request and answer it whole, or as a stream of server-sent events."""
    try:
        spec = engine.resolve(body.model)
    except UnknownModel as exc:
        raise ApiError(404, str(exc), code="model_not_found") from None
    except FedlmError as exc:
        raise ApiError(400, str(exc)) from None
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(max_tokens or DEFAULT_MAX_TOKENS, body.temperature, body.top_p, stop, body.seed)
    limit = context_limit(engine.mixed)
    if not prompt:
        raise ApiError(400, "the prompt is empty")
    if limit is not None and len(prompt) + params.max_tokens > limit:
        raise ApiError(
            400, f"the prompt ({len(prompt)} tokens) plus `max_tokens` ({params.max_tokens}) exceeds the model's context of {limit} tokens"
        )
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def put(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    engine.submit(Job(spec, prompt, params, lambda t: put("text", t), lambda c: put("done", c), lambda e: put("error", e)))
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(events, ident, body.model, chat, usage), media_type="text/event-stream")
    while True:
        kind, value = await events.get()
        if kind == "error":
            raise ApiError(500, f"generation failed: {value}", "server_error")
        if kind == "done":
            return _whole(value, ident, body.model, chat)


def _usage(result: Completion) -> dict[str, int]:
    new = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": new, "total_tokens": result.prompt_tokens + new}


def _whole(result: Completion, ident: str, model: str, chat: bool) -> dict[str, Any]:
    usage = _usage(result)
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    kind = "chat.completion" if chat else "text_completion"
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model, "choices": [choice], "usage": usage}


async def _stream(events: asyncio.Queue[tuple[str, Any]], ident: str, model: str, chat: bool, usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}) + "\n\n"

    if chat:
        yield chunk(None, None, first=True)
    while True:
        event, value = await events.get()
        if event == "text":
            yield chunk(value, None)
        elif event == "done":
            yield chunk(None, value.finish_reason)
            if usage:
                head = {"id": ident, "object": kind, "created": created, "model": model, "choices": []}
                yield "data: " + json.dumps({**head, "usage": _usage(value)}) + "\n\n"
            break
        else:
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {value}", "type": "server_error"}}) + "\n\n"
            break
    yield "data: [DONE]\n\n"
