"""The OpenAI-compatible HTTP server: FastAPI routes over one `AsyncLLM`, run by uvicorn.

    POST /v1/completions         serving_completion.py
    POST /v1/chat/completions    serving_chat.py
    GET  /v1/models              the model served, and its LoRA adapters (stage 11)
    POST /v1/load_lora_adapter   stage 11: vLLM's runtime adapter loading (serving_models.py)
    POST /v1/unload_lora_adapter
    POST /tokenize, /detokenize  vLLM's: text <-> token ids, as the engine tokenizes a prompt
    GET  /health                 200 while the engine loop is alive, else 503 (data parallel:
                                 while one replica is; the body says which are, engine/dp_client.py)
    GET  /metrics                Prometheus text (engine/metrics.py)
    GET  /trace/                 with `--trace`: the live step page (trace/page.py)

When the server has an API key, every route but `/health` and `/metrics` (load balancers and
scrapers call them, as in `vllm serve`) needs `Authorization: Bearer KEY`; a browser may give
the key as the password of HTTP Basic auth instead, for the `/trace/` page. The key and the
body's size are checked by `RequestGate`, in front of every route, before the body is parsed.

Errors: everything a client can send wrong is answered in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` — 400 for bad values, types, unknown fields
and malformed JSON, 401 for the key, 404 for an unknown model or route, 408 for a body not sent
within `--request-body-timeout`, 413 for a body past `--max-request-bytes`, 503 with
`Retry-After` while `--max-waiting-requests` wait — never a traceback. A request that fails
validation never reaches the engine, so it cannot harm the others.

Start it with `folovllm serve MODEL` (entrypoints/cli.py); `build_app` is what tests run.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import signal
from functools import partial
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional, Sequence, Union

import h11
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from folovllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestAbortedError
from folovllm.engine.dp_client import DPAsyncLLM
from folovllm.engine.llm_engine import LLMEngine
from folovllm.engine.metrics import CONTENT_TYPE
from folovllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                  DetokenizeRequest, DetokenizeResponse, ErrorInfo,
                                                  ErrorResponse, LoadLoRAAdapterRequest, ModelList,
                                                  TokenizeRequest, TokenizeResponse,
                                                  UnloadLoRAAdapterRequest)
from folovllm.entrypoints.openai.serving_chat import OpenAIServingChat
from folovllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from folovllm.entrypoints.openai.serving_engine import APIError, ServerOptions
from folovllm.entrypoints.openai.serving_models import OpenAIServingModels
from folovllm.trace.page import mount_live_page

logger = logging.getLogger("folovllm.server")
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key


def build_app(async_llm: AsyncLLM, model_name: str, api_key: Optional[str] = None,
              options: ServerOptions = ServerOptions(),
              lora_modules: Sequence[tuple[str, str]] = ()) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine loop and stops it on shutdown.
    `lora_modules`: (name, path) of the LoRA adapters served from the start (stage 11)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_llm.start()
        yield
        await async_llm.shutdown()

    app = FastAPI(title="folovllm", lifespan=lifespan)
    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=options.max_request_bytes,
                       body_timeout_s=options.request_body_timeout_s)
    completion = OpenAIServingCompletion(async_llm, model_name, options)
    chat = OpenAIServingChat(async_llm, model_name, options)
    engine = async_llm.engine
    served_models = OpenAIServingModels(async_llm, model_name, lora_modules)
    completion.models = chat.models = served_models

    v1 = APIRouter(prefix="/v1")

    @v1.post("/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await completion.create_completion(request, raw_request)

    @v1.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    @v1.get("/models")
    async def models() -> Response:
        cards = served_models.model_cards(engine.config.max_model_len)
        return JSONResponse(ModelList(data=cards).model_dump(exclude_none=True))

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
        return Response(await served_models.load_lora_adapter(request), media_type="text/plain")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
        return Response(await served_models.unload_lora_adapter(request), media_type="text/plain")

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Response:
        completion.check_model(request.model)
        completion.check_prompt_chars(len(request.prompt), "prompt")
        ids = await async_llm.run_off_loop(
            partial(engine.tokenizer.encode, request.prompt, add_special_tokens=request.add_special_tokens))
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=engine.config.max_model_len,
                                             tokens=ids).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Response:
        completion.check_model(request.model)
        bad = [t for t in request.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"tokens must be token ids of this model, in [0, {engine.vocab_size}), "
                                f"got {bad[:5]}", param="tokens")
        text = await async_llm.run_off_loop(engine.tokenizer.decode, request.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    @app.get("/health")
    async def health() -> Response:
        status_code = 200 if async_llm.is_running else 503
        if isinstance(async_llm, DPAsyncLLM):  # which replicas serve, which stopped and why
            return JSONResponse(async_llm.health_detail(), status_code=status_code)
        return Response(status_code=status_code)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(async_llm.metrics.render(), media_type=CONTENT_TYPE)

    if engine.config.trace:  # `folovllm serve --trace`: a live page of the engine's steps
        mount_live_page(app, engine)

    _add_error_handlers(app)
    return app


def _error(status_code: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status_code)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        response = _error(e.status_code, e.info)
        response.headers.update(e.headers)  # Retry-After on a 503 for a full queue
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # The first problem, named by its field path: "temperature: Input should be a valid number".
        err = e.errors()[0]
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {err.get('ctx', {}).get('error', message)}", None
        elif not loc:  # FastAPI reads the body as JSON only with that content type
            message = "the body must be a JSON object, sent with 'Content-Type: application/json'"
        elif param:
            message = f"{param}: {message}"
        return _error(400, ErrorInfo(message=message, type="invalid_request_error", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, ErrorInfo(message=str(e.detail), type="invalid_request_error"))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(503, ErrorInfo(message=str(e), type="server_error"))

    @app.exception_handler(RequestAbortedError)
    async def aborted(_: Request, e: RequestAbortedError) -> JSONResponse:
        return _error(503, ErrorInfo(message=str(e), type="server_error"))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")  # the traceback goes to the server log, not the client
        return _error(500, ErrorInfo(message=f"internal server error ({type(e).__name__})",
                                     type="server_error"))


class RequestGate:
    """ASGI middleware in front of every route: the API key first (401), then the body, read
    here up to `max_body_bytes` (413 past it, with or without a Content-Length) within
    `body_timeout_s` of the headers (408 and the connection closed after it), and handed on
    whole. So a client without the key is refused before its body is parsed, no body larger
    than the limit is held or parsed, and a client that trickles its body (or never ends it)
    cannot hold a connection for ever: uvicorn's own timeouts cover only an idle connection
    between requests (`timeout_keep_alive`), and h11 has none for a body."""

    def __init__(self, app: ASGIApp, api_key: Optional[str], max_body_bytes: int,
                 body_timeout_s: float = 60.0) -> None:
        self.app = app
        self.api_key = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS \
                and not self._has_key(headers.get(b"authorization", b"")):
            # WWW-Authenticate: a browser opening /trace/ asks for the key (as the password).
            return await _send_error(scope, send, 401, ErrorInfo(
                message="Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                type="invalid_request_error", code="invalid_api_key"),
                headers={"WWW-Authenticate": 'Basic realm="folovllm"'})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, send)
        chunks: list[bytes] = []
        size, more = 0, True
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return await self._too_slow(scope, send, size)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._too_large(scope, send)
            more = message.get("more_body", False)
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if body_sent:  # then the disconnect, which handlers wait for (serving_engine.py)
                return await receive()
            body_sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _has_key(self, authorization: bytes) -> bool:
        """`Bearer KEY`, or HTTP Basic with KEY as the password (any user name): a browser
        cannot send a bearer token, but asks for Basic credentials on a 401."""
        assert self.api_key is not None
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() == b"basic":
            try:
                given = base64.b64decode(given, validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != b"bearer":
            return False
        return secrets.compare_digest(given, self.api_key)

    async def _too_slow(self, scope: Scope, send: Send, size: int) -> None:
        # Connection: close, since the rest of the body may still come: uvicorn closes it.
        await _send_error(scope, send, 408, ErrorInfo(
            message=f"the request body did not arrive within {self.body_timeout_s:g} s "
                    f"({size} bytes came; --request-body-timeout)", type="invalid_request_error",
            code="request_timeout"), headers={"Connection": "close"})

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await _send_error(scope, send, 413, ErrorInfo(
            message=f"the request body is larger than this server's limit of {self.max_body_bytes} "
                    "bytes (--max-request-bytes)", type="invalid_request_error", code="request_too_large"))


async def _send_error(scope: Scope, send: Send, status_code: int, info: ErrorInfo,
                      headers: Optional[dict[str, str]] = None) -> None:
    response = _error(status_code, info)
    response.headers.update(headers or {})
    await response(scope, _nothing_to_receive, send)


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 connection, closed when a request's headers are not complete
    `header_timeout_s` after the connection opened (or after its last answer). uvicorn times
    only an idle connection between requests (`timeout_keep_alive`, armed after an answer):
    a client that connected and sent nothing, or half its headers, held the connection for
    ever, and `RequestGate` never sees it (there is no request yet). nginx's
    client_header_timeout answers the same way."""

    header_timeout_s = 60.0
    _header_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_due)

    def _headers_due(self) -> None:
        # IDLE: h11 is still waiting for (the rest of) a request line and its headers.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: FastAPI, options: ServerOptions = ServerOptions(), **kwargs: object) -> uvicorn.Config:
    """The server's uvicorn settings (`run_server`'s, and the tests'): h11 with the header
    timeout of `options.request_body_timeout_s`."""
    protocol = type("H11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": options.request_body_timeout_s})
    return uvicorn.Config(app, http=protocol, **kwargs)  # type: ignore[arg-type]


# --8<-- [start:run_server]
SHUTDOWN_DRAIN_S = 2.0  # after the grace: time for the streams' last chunks to be sent


class GracefulServer(uvicorn.Server):
    """uvicorn, ending every open stream properly when the shutdown grace is over.

    On SIGINT/SIGTERM uvicorn stops accepting connections, waits for open responses up to its
    `timeout_graceful_shutdown`, then cancels them: a stream cut there has no finish chunk and
    no `[DONE]`, and the `openai` client reports a connection error. So at `grace_s` this
    server ends them itself (`AsyncLLM.abort_all`): each open sample gets
    `finish_reason: "abort"`, then `[DONE]`, and a request still waiting for its whole answer a
    503; uvicorn's own deadline comes `SHUTDOWN_DRAIN_S` later, for those last bytes."""

    def __init__(self, config: uvicorn.Config, async_llm: AsyncLLM, grace_s: float) -> None:
        config.timeout_graceful_shutdown = grace_s + SHUTDOWN_DRAIN_S
        super().__init__(config)
        self.async_llm, self.grace_s = async_llm, grace_s

    async def shutdown(self, sockets: Optional[list] = None) -> None:
        end_streams = asyncio.get_running_loop().call_later(
            self.grace_s, self.async_llm.abort_all, "the server is shutting down")
        try:
            await super().shutdown(sockets)
        finally:
            end_streams.cancel()


def run_server(engine: Union[LLMEngine, DPAsyncLLM], model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: Optional[str] = None, options: ServerOptions = ServerOptions(),
               shutdown_grace_s: float = 10.0, lora_modules: Sequence[tuple[str, str]] = ()) -> None:
    """Serve until SIGINT/SIGTERM. The server then stops accepting connections, lets open
    requests finish (up to `shutdown_grace_s`, then ends them: `GracefulServer`), and runs the
    app's lifespan exit, which stops the engine loop. The process then exits with status 0.
    `engine` may be a `DPAsyncLLM` (`--data-parallel-size` > 1): its replicas are stopped there."""
    async_llm = engine if isinstance(engine, DPAsyncLLM) else AsyncLLM(engine, model_name)
    app = build_app(async_llm, model_name, api_key, options, lora_modules)
    config = uvicorn_config(app, options, host=host, port=port, log_level="info")
    # uvicorn catches the signal, shuts down gracefully, then raises the signal again with the
    # handler it found: make that an ordinary exit instead of death by SIGTERM.
    previous = signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        GracefulServer(config, async_llm, shutdown_grace_s).run()
    except KeyboardInterrupt:  # SIGINT, raised again the same way
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)
# --8<-- [end:run_server]
