"""Domain errors and their RFC 9457 problem+json rendering.

Services raise `Problem` subclasses; the API turns every error (ours,
validation, routing, unexpected) into `application/problem+json` with a stable
`code` and the request id, so clients can branch on `code` and support can
find the log line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from plantwatch.core.jsonutil import dumps

PROBLEM_CONTENT_TYPE = "application/problem+json"
log = structlog.get_logger("plantwatch.errors")


class Problem(Exception):
    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extra = extra


class NotFound(Problem):
    status, code, title = 404, "not_found", "Not found"


class Conflict(Problem):
    status, code, title = 409, "conflict", "Conflict"


class Unauthorized(Problem):
    status, code, title = 401, "unauthorized", "Authentication required"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kwargs)


class Forbidden(Problem):
    status, code, title = 403, "forbidden", "Forbidden"


class TooManyRequests(Problem):
    status, code, title = 429, "too_many_requests", "Too many requests"


class InvalidInput(Problem):
    """A semantic check failed on a well-formed body; `errors` carries field paths."""

    status, code, title = 422, "validation_error", "Invalid input"

    def __init__(self, path: Sequence[str | int], message: str, **kwargs: Any) -> None:
        super().__init__(
            message,
            errors=[{"path": _dotted(("body", *path)), "message": message, "type": "value_error"}],
            **kwargs,
        )


def invalid_body(problems: Sequence[tuple[str, str]]) -> Problem:
    """422 for several problems at once; each path is a dotted path under `body`."""
    errors = [
        {"path": f"body.{path}", "message": msg, "type": "value_error"} for path, msg in problems
    ]
    detail = "; ".join(f"{e['path']}: {e['message']}" for e in errors[:5])
    return Problem(detail, status=422, code="validation_error", errors=errors)


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def problem_response(
    request: Request,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body: dict[str, Any] = {
        "type": f"urn:plantwatch:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": request.url.path,
        "request_id": getattr(request.state, "request_id", None),
    }
    body.update(extra)
    return Response(
        dumps(body), status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers
    )


_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    429: ("too_many_requests", "Too many requests"),
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return problem_response(
            request, exc.status, exc.code, exc.title, exc.detail, exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {
                "path": _dotted(err.get("loc", ())),
                "message": err.get("msg", "invalid"),
                "type": err.get("type", "value_error"),
            }
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['path']}: {e['message']}" for e in errors[:5])
        return problem_response(
            request, 422, "validation_error", "Invalid input", detail, errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem_response(
            request, exc.status_code, code, title, detail, dict(exc.headers or {})
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return problem_response(
            request, 500, "internal_error", "Internal server error", "An unexpected error occurred"
        )
