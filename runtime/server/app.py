"""OpenAI-compatible HTTP API over an `AsyncEngine`.

`/v1/completions` and `/v1/chat/completions` (streamed as server-sent events or not),
`/v1/models`, `/health` and Prometheus `/metrics`. Errors use OpenAI's JSON body
(`{"error": {"message", "type", "param", "code"}}`): 400 for invalid parameters (FastAPI's 422
validation errors included), 401 for a missing or wrong key, 503 with Retry-After when the
queue is full. A client that goes away mid-request frees its slot. Usage carries the standard
token counts; a request's DSpark figures (tau, rounds, drafts verified and accepted) are in
the extension field `dspark`.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..engine import Request as EngineRequest
from ..stats import RequestOutput
from .async_engine import AsyncEngine, Event, QueueFull
from .metrics import ServerMetrics

DISCONNECT_POLL_S = 0.5


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


class _Sampling(BaseModel):
    """Fields both endpoints take; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content
                       if part.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class StopText:
    """Cuts streamed text at the first stop string; holds back a tail that may start one."""

    def __init__(self, stop: str | list[str] | None) -> None:
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer, self.stopped = "", False

    def push(self, text: str) -> str:
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return out
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class _Generation:
    """One request's run: its events, stop strings and the figures of its reply."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, prompt_ids: list[int],
                 body: _Sampling, max_tokens: int) -> None:
        self.engine, self.metrics, self.prompt_ids = engine, metrics, prompt_ids
        self.stop = StopText(body.stop)
        self.started, self.first_at = time.perf_counter(), None
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        try:
            self.request_id, self.queue = engine.submit(
                EngineRequest(prompt_ids, max_tokens, body.temperature, seed))
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="prompt") from exc
        except QueueFull as exc:
            metrics.requests.labels("rejected").inc()
            raise OpenAIError(503, f"the server is at capacity ({exc}); retry later",
                              type="server_error", code="server_overloaded",
                              headers={"Retry-After": "1"}) from exc
        self.output: RequestOutput | None = None

    async def events(self, http: Request) -> AsyncIterator[str]:
        """Text pieces until the request ends; cancels it if the client goes away."""
        try:
            while True:
                try:
                    event: Event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if event.kind == "error":
                    self.output = RequestOutput("", [], len(self.prompt_ids), "error")
                    self.metrics.requests.labels("error").inc()
                    raise OpenAIError(500, event.text, type="server_error")
                if event.kind == "done":
                    self.output = event.output
                    tail = "" if self.stop.stopped else self.stop.flush()
                    if tail:
                        yield tail
                    self._record()
                    return
                if self.stop.stopped:
                    continue
                if self.first_at is None:
                    self.first_at = time.perf_counter()
                    self.metrics.ttft.observe(self.first_at - self.started)
                piece = self.stop.push(event.text)
                if self.stop.stopped:
                    self.engine.cancel(self.request_id)  # its output still arrives as "done"
                if piece:
                    yield piece
        except BaseException:
            if self.output is None:
                self.engine.cancel(self.request_id)
                self.metrics.requests.labels("cancelled").inc()
            raise

    def _record(self) -> None:
        out, m = self.output, self.metrics
        m.requests.labels("ok").inc()
        m.prompt_tokens.inc(len(self.prompt_ids))
        m.cached_prompt_tokens.inc(out.cached_tokens)
        m.generated.inc(len(out.token_ids))
        if self.first_at is not None and len(out.token_ids) > 1:
            m.itl.observe((time.perf_counter() - self.first_at) / (len(out.token_ids) - 1))

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stop.stopped or self.output.finish_reason == "stop" else "length"

    def usage(self) -> dict[str, Any]:
        n = len(self.output.token_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n,
                "total_tokens": len(self.prompt_ids) + n,
                "prompt_tokens_details": {"cached_tokens": self.output.cached_tokens}}

    def dspark(self) -> dict[str, Any]:
        out = self.output
        return {"tau": round(out.tau, 4), "rounds": len(out.accepted),
                "drafts_verified": sum(out.verified), "drafts_accepted": sum(out.accepted)}


def create_app(engine: AsyncEngine, metrics: ServerMetrics, *, model_name: str,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app; it starts the engine thread on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="dspark-runtime", lifespan=lifespan)
    tokenizer = engine.pipe.tokenizer
    capacity = engine.engine.capacity

    async def authorize(http: Request) -> None:
        if api_key is None:
            return
        header = http.headers.get("authorization", "")
        if not secrets.compare_digest(header, f"Bearer {api_key}"):
            raise OpenAIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                              code="invalid_api_key")

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return OpenAIError(400, f"the request body is not valid JSON ({first['msg']} at "
                               f"character {first['loc'][-1]})").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        return OpenAIError(400, f"{where}: {first['msg']}" if where else first["msg"],
                           param=where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    def check(body: _Sampling, prompt_ids: list[int], param: str) -> int:
        """Refusals before the engine sees the request; the token budget."""
        if body.model != model_name:
            raise OpenAIError(400, f"model '{body.model}' is not served here (this server "
                              f"serves '{model_name}')", param="model", code="model_not_found")
        if body.n != 1:
            raise OpenAIError(400, "n must be 1", param="n")
        if body.top_p != 1.0:
            raise OpenAIError(400, "top_p must be 1: speculative verification here is lossless "
                              "for the full distribution only", param="top_p")
        if not prompt_ids:
            raise OpenAIError(400, "the prompt is empty", param=param)
        if len(prompt_ids) + 1 > capacity:
            raise OpenAIError(400, f"the prompt has {len(prompt_ids)} tokens; this server's "
                              f"context is {capacity} tokens", param=param,
                              code="context_length_exceeded")
        limit = capacity - len(prompt_ids)
        wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens
        return min(wanted, limit) if wanted else limit

    async def run(http: Request, body: _Sampling, prompt_ids: list[int], param: str,
                  chat: bool) -> Any:
        gen = _Generation(engine, metrics, prompt_ids, body, check(body, prompt_ids, param))
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        base = {"id": ident, "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(gen, http, base, chat, include_usage),
                                     media_type="text/event-stream")
        text = "".join([piece async for piece in gen.events(http)])
        choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {**base, "object": "chat.completion" if chat else "text_completion",
                "choices": [choice], "usage": gen.usage(), "dspark": gen.dspark()}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(http: Request, body: CompletionRequest) -> Any:
        ids = (list(body.prompt) if isinstance(body.prompt, list)
               else tokenizer.encode_prompt(body.prompt, raw=True))
        return await run(http, body, ids, "prompt", chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(http: Request, body: ChatRequest) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tokenizer.encode_messages(messages)
        except ValueError as exc:  # no chat template, or the template refused the turns
            raise OpenAIError(400, str(exc), param="messages") from exc
        return await run(http, body, ids, "messages", chat=True)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "dspark-runtime"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        waiting, running = engine.load()
        return {"status": "ok", "waiting": waiting, "running": running,
                "slots": len(engine.engine.slots)}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        metrics.load(*engine.load())
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


async def _sse(gen: _Generation, http: Request, base: dict[str, Any], chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {} if piece is None else {"content": piece}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return _event({**base, "object": kind, "choices": [choice]})

    try:
        if chat:
            yield chunk("", None, first=True)
        async for piece in gen.events(http):
            yield chunk(piece, None)
        yield chunk(None, gen.finish_reason)
        if include_usage:
            yield _event({**base, "object": kind, "choices": [], "usage": gen.usage(),
                          "dspark": gen.dspark()})
    except OpenAIError as exc:  # headers are sent: the error travels as an event
        yield _event({"error": {"message": exc.message, "type": exc.type, "param": None,
                                "code": exc.code}})
    yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
