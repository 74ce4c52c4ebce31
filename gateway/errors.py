"""Errors in OpenAI's shape, and the one place that maps exceptions to status codes."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError as DatabaseOperationalError
from sqlalchemy.exc import TimeoutError as DatabasePoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ConflictError, DomainError, InvalidInput, NotFoundError

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the answer: counted, never sent
REGISTRY_RETRY_AFTER_S = 2  # seconds a 503 for a registry database that did not answer asks the client to wait


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""

    error: ErrorBody


class APIError(Exception):
    """An error the client should see; subclasses fix the status and OpenAI error type.

    `retry_after` (seconds) tells a client that may try again when to: it becomes a `Retry-After` header.
    """

    status_code = 500
    error_type = "server_error"
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        """HTTP headers that go with the error: `Retry-After` in whole seconds (at least 1), as HTTP defines it."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def json(self) -> str:
        return json.dumps(self.body())


class BadRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    error_type = "authentication_error"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class Conflict(APIError):
    status_code = 409
    error_type = "invalid_request_error"


class Unprocessable(APIError):
    status_code = 422
    error_type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"


class InternalError(APIError):
    status_code = 500
    error_type = "server_error"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request (malformed JSON, wrong types, context length exceeded)",
        401: "Missing or wrong bearer key",
        404: "Unknown model or prompt",
        500: "Engine failure",
        503: "Engine unavailable, or the prompt registry's database did not answer (retry after `Retry-After`)",
    }.items()
}


def from_domain(exc: DomainError) -> APIError:
    """The one mapping from the system's own errors to HTTP: not found 404, conflict 409, invalid 422."""
    cls: type[APIError] = InternalError
    if isinstance(exc, NotFoundError):
        cls = NotFound
    elif isinstance(exc, ConflictError):
        cls = Conflict
    elif isinstance(exc, InvalidInput):
        cls = Unprocessable
    return cls(exc.message, param=exc.param, code=exc.code)


# SQLite's OperationalError also stands for a statement's own faults ("no such table"): a bug, a 500. These are
# the database being busy, full or unreadable for now (primary result codes; extended ones carry a suffix).
SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN")


def database_unavailable(exc: Exception) -> bool:
    """Whether a database error means the registry's database did not answer, not that the statement was wrong:
    for PostgreSQL every OperationalError (the server, the connection, a deadlock or timeout) and a pool timeout;
    for SQLite a busy, locked, full or unreadable database."""
    if isinstance(exc, DatabasePoolTimeout):
        return True
    name = getattr(getattr(exc, "orig", None), "sqlite_errorname", None)
    return name is None or str(name).startswith(SQLITE_UNAVAILABLE)


def database_reason(exc: Exception) -> str:
    """The driver's first line ("database is locked", "connection refused" with the host): for the log only."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]


def registry_unavailable() -> ServiceUnavailable:
    """The 503 for a registry database that did not answer. As with /ready, the client is not told the database's
    address or the driver's words (they go to the log)."""
    return ServiceUnavailable("the prompt registry's database did not answer (busy, or not reachable); try again",
                              code="registry_unavailable", retry_after=REGISTRY_RETRY_AFTER_S)


def error_json(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def register_exception_handlers(app: FastAPI) -> None:
    """Every failure leaves the gateway in OpenAI's error shape; the admin API uses 422 for bad bodies."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_json(exc)

    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DomainError)
        return error_json(from_domain(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip()
            return error_json(BadRequest(message.rstrip(": "), code="invalid_json"))
        details = "; ".join(
            f"{_validation_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5]
        )
        param = _validation_param(tuple(first.get("loc", ())))
        cls: type[APIError] = Unprocessable if request.url.path.startswith("/v1/prompts") else BadRequest
        if first.get("type") == "extra_forbidden":  # as OpenAI answers a field it does not know
            return error_json(cls(f"unrecognized request argument supplied: {param}", param=param,
                                  code="unrecognized_argument"))
        return error_json(cls(f"invalid request: {details}", param=param, code="invalid_value"))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        cls = {404: NotFound, 401: Unauthorized, 413: PayloadTooLarge}.get(exc.status_code, BadRequest)
        err = cls(str(exc.detail))
        err.status_code = exc.status_code
        if exc.status_code == 405:
            err.error_type = "invalid_request_error"
        return error_json(err)

    async def on_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # A database locked past its busy timeout, a PostgreSQL that is down or restarting, a full pool: the
        # request's transaction rolled back (unless the connection broke in its very commit), and the same
        # request may be sent again: the service is unavailable for now, a 503, not a bug's 500.
        if not database_unavailable(exc):
            return await on_unexpected(request, exc)
        log.warning("%s %s: the registry's database did not answer: %s", request.method, request.url.path,
                    database_reason(exc))  # not the statement and its values (a prompt's template, say)
        return error_json(registry_unavailable())

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_json(InternalError(f"internal error: {type(exc).__name__}"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(DomainError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(DatabaseOperationalError, on_database_unavailable)
    app.add_exception_handler(DatabasePoolTimeout, on_database_unavailable)
    app.add_exception_handler(Exception, on_unexpected)
