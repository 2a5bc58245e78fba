"""API-shaped error bodies and responses, as the Anthropic Messages API sends them.

Every error is ``{"type": "error", "error": {"type": <error type>, "message": <text>}}`` with
the HTTP status that belongs to the error type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

__all__ = ["ERROR_STATUS", "error_body", "error_response"]

#: HTTP status for each API error type (https://docs.anthropic.com/en/api/errors).
ERROR_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """Return the JSON body of an API error."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_response(
    error_type: str,
    message: str,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Return a JSON error response whose status matches ``error_type`` unless ``status`` is given."""
    code = status if status is not None else ERROR_STATUS.get(error_type, 500)
    return JSONResponse(error_body(error_type, message), status_code=code, headers=dict(headers or {}))
