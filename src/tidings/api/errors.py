"""Every error the API returns, mapped in one place to `{"error", "message"}`."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidings import errors

log = logging.getLogger(__name__)

STATUS_OF: list[tuple[type[errors.TidingsError], int]] = [
    (errors.Unauthenticated, 401),
    (errors.Forbidden, 403),
    (errors.PayloadTooLarge, 413),
    (errors.InvalidInput, 422),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.StoreUnavailable, 503),
    (errors.BrokerUnavailable, 503),
]


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    """The one error shape."""
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def describe(error: dict[str, Any]) -> str:
    """One validation problem as `field: what is wrong`."""
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "extra_forbidden":
        message = "unknown field; remove it"
    elif error.get("type") == "json_invalid":
        ctx = error.get("ctx") or {}
        return f"the body is not valid JSON ({ctx.get('error', 'parse error')}); send UTF-8 JSON"
    return f"{where or 'body'}: {message}"


def answer_for(exc: Exception) -> JSONResponse:
    """The response to an error raised while handling a request, on any route."""
    if isinstance(exc, errors.TidingsError):
        status = next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 500)
        if status >= 500:
            log.error("request failed: %s", exc, extra={"action": "api_error"})
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        return error_response(status, exc.code, exc.message, **headers)
    if isinstance(exc, DataError):
        # The database refused a value (e.g. NUL in text on PostgreSQL); parameters hidden.
        return error_response(
            422, "invalid_input", "a value was refused by the database (e.g. a NUL character)"
        )
    log.error("unexpected error", exc_info=exc, extra={"action": "api_crash"})
    return error_response(
        500, "internal_error", "Tidings failed to handle the request; see its log"
    )


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _allowed_methods(request: Request) -> str:
    """Every documented method on the request's path, for the `Allow` of a 405.

    The router's own 405 names only the first route that matched the path, where one path
    often has several (GET and POST /v1/endpoints); the OpenAPI document names them all.
    """
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    methods: set[str] = set()
    for template, operations in paths.items():
        parts = re.split(r"(\{[^}/]+\})", template)
        pattern = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
        if re.fullmatch(pattern, request.url.path):
            methods.update(m.upper() for m in operations if m in _HTTP_METHODS)
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(errors.TidingsError)
    async def _tidings_error(_: Request, exc: errors.TidingsError) -> JSONResponse:
        return answer_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [describe(dict(e)) for e in exc.errors()[:5]]
        return error_response(422, "invalid_input", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # FastAPI's answer to a body that is not UTF-8 (or not decodable at all).
            return error_response(
                422, "invalid_input", "the body could not be decoded; send JSON encoded as UTF-8"
            )
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        # Keep what the router says, e.g. the `Allow` header of a 405 (RFC 9110).
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        return error_response(exc.status_code, code, str(exc.detail), **headers)

    @app.exception_handler(DataError)
    async def _data_error(_: Request, exc: DataError) -> JSONResponse:
        return answer_for(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return answer_for(exc)
