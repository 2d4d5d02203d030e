"""The OpenAI-compatible HTTP server: FastAPI routes over one `AsyncLLM`, run by uvicorn.

    POST /v1/completions         serving_completion.py
    POST /v1/chat/completions    serving_chat.py
    GET  /v1/models              the one model served
    GET  /health                 200 while the engine loop is alive, else 503
    GET  /metrics                Prometheus text (engine/metrics.py)
    GET  /trace/                 with `--trace`: the live step page (trace/page.py)

`/v1/*` need `Authorization: Bearer KEY` when the server has an API key; `/health` and
`/metrics` never do (load balancers and scrapers call them), as in `vllm serve`.

Errors: everything a client can send wrong is answered in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` — 400 for bad values, types, unknown fields
and malformed JSON, 401 for the key, 404 for an unknown model or route — never a traceback.
A request that fails validation never reaches the engine, so it cannot harm the others.

Start it with `folovllm serve MODEL` (entrypoints/cli.py); `build_app` is what tests run.
"""

from __future__ import annotations

import logging
import secrets
import signal
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from folovllm.engine.async_llm import AsyncLLM, EngineDeadError
from folovllm.engine.llm_engine import LLMEngine
from folovllm.engine.metrics import CONTENT_TYPE
from folovllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, ErrorInfo,
                                                  ErrorResponse, ModelCard, ModelList)
from folovllm.entrypoints.openai.serving_chat import OpenAIServingChat
from folovllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from folovllm.entrypoints.openai.serving_engine import APIError
from folovllm.trace.page import mount_live_page

logger = logging.getLogger("folovllm.server")


def build_app(async_llm: AsyncLLM, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine loop and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_llm.start()
        yield
        await async_llm.shutdown()

    app = FastAPI(title="folovllm", lifespan=lifespan)
    completion = OpenAIServingCompletion(async_llm, model_name)
    chat = OpenAIServingChat(async_llm, model_name)
    engine = async_llm.engine

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await completion.create_completion(request, raw_request)

    @v1.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    @v1.get("/models")
    async def models() -> Response:
        card = ModelCard(id=model_name, max_model_len=engine.config.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if async_llm.is_running else 503)

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
        return _error(e.status_code, e.info)

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

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")  # the traceback goes to the server log, not the client
        return _error(500, ErrorInfo(message=f"internal server error ({type(e).__name__})",
                                     type="server_error"))


# --8<-- [start:run_server]
def run_server(engine: LLMEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: Optional[str] = None) -> None:
    """Serve until SIGINT/SIGTERM. uvicorn then stops accepting connections, lets open requests
    finish (up to 10 s, then cancels them: their streams abort), and runs the app's lifespan
    exit, which stops the engine loop. The process then exits with status 0."""
    import uvicorn

    app = build_app(AsyncLLM(engine, model_name), model_name, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    # uvicorn catches the signal, shuts down gracefully, then raises the signal again with the
    # handler it found: make that an ordinary exit instead of death by SIGTERM.
    previous = signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # SIGINT, raised again the same way
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)
# --8<-- [end:run_server]
