"""The Models API: ``GET /v1/models`` (newest first, paginated) and ``GET /v1/models/{model_id}``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tierq.sim.catalogue import ModelEntry
from tierq.sim.errors import (
    ApiError,
)
from tierq.sim.http import PageQuery, catalogue_of, check_api_key, check_version, fail, page_slice

__all__ = ["get_model", "list_models"]


def _page(models: list[ModelEntry], query: PageQuery) -> dict[str, Any]:
    begin, end, has_more = page_slice([m.id for m in models], query, "model")
    chosen = models[begin:end]
    return {
        "data": [m.model_info() for m in chosen],
        "first_id": chosen[0].id if chosen else None,
        "last_id": chosen[-1].id if chosen else None,
        "has_more": has_more,
    }


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the catalogue, most recently released first (aliases not listed)."""
    try:
        check_version(request)
        check_api_key(request)
        try:
            query = PageQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ApiError("invalid_request_error", f"{loc}: {first['msg']}") from None
        page = _page(catalogue_of(request).models(), query)
    except ApiError as exc:
        return fail(request, exc, None)
    return JSONResponse(page)


async def get_model(request: Request) -> Response:
    """``GET /v1/models/{model_id}``: one ``ModelInfo``; an alias answers with the model it names."""
    model_id: str = request.path_params["model_id"]
    try:
        check_version(request)
        check_api_key(request)
        entry = catalogue_of(request).resolve(model_id)
        if entry is None:
            raise ApiError("not_found_error", f"model: {model_id}")
    except ApiError as exc:
        return fail(request, exc, None)
    return JSONResponse(entry.model_info())
