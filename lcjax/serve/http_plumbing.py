"""HTTP plumbing of the OpenAI-compatible API: error objects, auth, client disconnects.

Every failure becomes an OpenAI error object with its status; `install_auth` checks the bearer
key on the API paths; `unless_disconnected` and `ClosingStreamingResponse` make sure a client
that leaves has its engine requests aborted; `check_text` turns a lone surrogate into a 400.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcjax.serve.async_engine import EngineError, EngineShutdown, RequestStream
from lcjax.serve.protocol import APIError, error_body

log = logging.getLogger("lcjax.serve")

AUTH_PREFIXES = ("/v1/", "/tokenize", "/detokenize")



def error(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[str] = None) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate can't be sent
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def validation_message(err: dict) -> tuple[str, Optional[str]]:
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return f"Malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if err.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {err.get('msg')} (got {err.get('input')!r}).", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("Invalid request.", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error(400, message, param=param)

    @app.exception_handler(APIError)
    async def apierror(_: Request, exc: APIError):
        return error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(ValueError)
    async def valueerror(_: Request, exc: ValueError):
        return error(400, str(exc))

    @app.exception_handler(EngineShutdown)
    async def shutting_down(_: Request, exc: EngineShutdown):
        return error(503, str(exc), "service_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def httperror(_: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                      else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        log.error("lcjax.serve: request failed", exc_info=exc)
        return error(500, f"Internal server error: {type(exc).__name__}: {exc}", "internal_error")


def install_auth(app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith(AUTH_PREFIXES) and request.method != "OPTIONS":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error(401, "Incorrect API key provided.", code="invalid_api_key")
        return await call_next(request)


class ClosingStreamingResponse(StreamingResponse):
    """Runs `on_close` however the response ends, even if the body was never iterated (a
    client gone before the first byte), so the engine requests are always released."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def unless_disconnected(request: Request, work, stream: Optional[RequestStream] = None):
    """Await `work`, cancelling it (and aborting `stream`) if the client disconnects first.

    Used for non-streaming responses, where Starlette itself does not watch the connection."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            if stream is not None:
                stream.close()
    if not task.done():  # the client left: let the work clean up (abort its requests), then stop
        await asyncio.wait({task})
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    try:
        return task.result()
    except EngineError as err:
        return error(500, str(err), "internal_error")


def check_text(value: Any, path: str = "") -> None:
    """400 naming the field of the first string holding a lone surrogate (JSON `\\ud800`
    escapes decode to one; it cannot be encoded as UTF-8, so it would fail deep inside)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(f"'{path}' holds a lone surrogate {value[err.start]!r} at character "
                           f"{err.start}; send valid Unicode text.", param=path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_text(item, f"{path}[{i}]")


def named_field(message: str, fields: dict) -> Optional[str]:
    """The request field an error message names (SamplingParams errors name their field)."""
    names = sorted((k for k in fields if k in message), key=len, reverse=True)
    return names[0] if names else None


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """lcjax's installed version (for /version), or 0.1.0 from a plain checkout."""
    try:
        from importlib.metadata import version
        return version("lcjax")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.1.0"
