"""Every HTTP error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status.

`APIError` is what route code raises; `install(app)` adds the handlers that turn it, FastAPI's validation errors
(one line naming the field, never the validator's dump), unknown routes and any unexpected exception (a 500 that
says nothing of the stack) into that shape. It owns no request logic.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.deployments.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def sse_error(message: str, status: int = 500) -> str:
    """An error inside a stream already answered 200: one SSE event in the same shape."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "internal_error"), code=status))
    return f"data: {body.model_dump_json()}\n\n"


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        # pydantic names union members ("str", "list[int]", "function-after[...]"): not fields
        if p.isdigit():
            out += f"[{p}]"
        elif out and ("[" in p or p in ("str", "int", "float", "bool", "list", "dict") or "-" in p):
            break
        else:
            out += ("." if out else "") + p
    return out


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(one-line message, param) for the first validation error."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "parse error")), None
    field = _field(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return f"unsupported field {field!r}", field or None
    if err.get("type") == "missing":
        return f"missing required field {field!r}", field or None
    if not field:
        return f"invalid request body: {msg}", None
    return f"invalid value for {field!r}: {msg}", field


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        msg, param = validation_message(list(e.errors()))
        return error_response(400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, f"no route {request.url.path}", code="not_found")
        if e.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {request.url.path}")
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unexpected error while serving a request")
        return error_response(500, f"internal error ({type(e).__name__})")
