"""API-shaped error bodies and responses, as the Anthropic Messages API sends them.

Every error is ``{"type": "error", "error": {"type": <error type>, "message": <text>}, "request_id":
<the request-id header>}`` with the HTTP status that belongs to the error type
(https://platform.claude.com/docs/en/api/errors, "Error shapes"), and an ``x-should-retry`` header:
``true`` for 408, 409, 429 and 5xx (529 included), ``false`` for the other 4xx. The SDK obeys that
header before its own status rules (``anthropic/_base_client.py``, ``_should_retry``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from starlette.responses import JSONResponse

__all__ = [
    "ERROR_STATUS",
    "SHOULD_RETRY_HEADER",
    "ApiError",
    "api_error_response",
    "error_body",
    "error_response",
    "should_retry",
]

#: HTTP status for each API error type (https://platform.claude.com/docs/en/api/errors).
ERROR_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}

#: Response header telling clients whether retrying can succeed.
SHOULD_RETRY_HEADER: Final = "x-should-retry"


class ApiError(Exception):
    """Raised inside the app to answer with an API error; carries what the response needs."""

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status if status is not None else ERROR_STATUS.get(error_type, 500)
        self.headers = dict(headers or {})
        self.details = dict(details) if details is not None else None


def should_retry(status: int) -> bool:
    """Whether the API tells clients to retry a response of ``status``."""
    return status in (408, 409, 429) or status >= 500


def error_body(
    error_type: str,
    message: str,
    *,
    request_id: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the JSON body of an API error (``request_id`` at the top level when known)."""
    error: dict[str, Any] = {"type": error_type, "message": message}
    if details is not None:
        error["details"] = dict(details)
    body: dict[str, Any] = {"type": "error", "error": error}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_response(
    error_type: str,
    message: str,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """Return a JSON error response whose status matches ``error_type`` unless ``status`` is given."""
    code = status if status is not None else ERROR_STATUS.get(error_type, 500)
    all_headers = {SHOULD_RETRY_HEADER: "true" if should_retry(code) else "false", **(headers or {})}
    if request_id is not None:
        all_headers["request-id"] = request_id
    body = error_body(error_type, message, request_id=request_id, details=details)
    return JSONResponse(body, status_code=code, headers=all_headers)


def api_error_response(exc: ApiError, request_id: str | None) -> JSONResponse:
    """Return the response of a raised :class:`ApiError`."""
    return error_response(
        exc.error_type,
        exc.message,
        status=exc.status,
        headers=exc.headers,
        request_id=request_id,
        details=exc.details,
    )
