"""Message Batches: create, retrieve, list, cancel, delete and results (JSON lines).

https://platform.claude.com/docs/en/api/messages/batches"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tierq.sim.batches import (
    BATCH_BASE_S,
    BATCH_EXPIRY_S,
    BATCH_PER_REQUEST_S,
    CUSTOM_ID_PATTERN,
    MAX_BATCH_BYTES,
    MAX_BATCH_REQUESTS,
    Batch,
    BatchItem,
    BatchStore,
)
from tierq.sim.errors import (
    ApiError,
    error_body,
)
from tierq.sim.faults import BATCH_ONLY_FAULTS, Fault, fault_error
from tierq.sim.http import (
    PageQuery,
    build_any_reply,
    catalogue_of,
    check_api_key,
    check_version,
    config_of,
    fail,
    page_slice,
    parse_json,
    pydantic_error,
    read_body,
    state_of,
)
from tierq.sim.validation import (
    InvalidRequest,
    Prompt,
    check_against_model,
    parse_messages_request,
    peek_model,
)

__all__ = ["batch_results", "cancel_batch", "create_batch", "delete_batch", "get_batch", "list_batches"]


class _BatchRequestItem(BaseModel):
    """One entry of ``requests`` (https://platform.claude.com/docs/en/api/messages/batches/create):
    exactly ``custom_id`` and ``params``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    custom_id: str = Field(pattern=CUSTOM_ID_PATTERN)
    params: dict[str, Any]


class _BatchCreateBody(BaseModel):
    """A ``POST /v1/messages/batches`` body: ``requests``, at least one (stricter: an empty batch is
    refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    requests: list[_BatchRequestItem] = Field(min_length=1)


def _batch_body(body: Any) -> _BatchCreateBody:
    """Check the shape and the batch limits; the count is checked before anything else is parsed."""
    if not isinstance(body, dict):
        raise ApiError("invalid_request_error", "Request body must be a JSON object")
    requests = body.get("requests")
    # https://platform.claude.com/docs/en/build-with-claude/batch-processing ("Batch limitations":
    # 100,000 Message requests)
    if isinstance(requests, list) and len(requests) > MAX_BATCH_REQUESTS:
        raise ApiError(
            "invalid_request_error",
            f"requests: a Message Batch may contain at most {MAX_BATCH_REQUESTS} requests, "
            f"got {len(requests)}",
        )
    try:
        parsed = _BatchCreateBody.model_validate(body)
    except ValidationError as exc:
        raise pydantic_error(exc) from None
    # https://platform.claude.com/docs/en/api/messages/batches/create (custom_id: "Must be unique for
    # each request within the Message Batch")
    first_index: dict[str, int] = {}
    for index, item in enumerate(parsed.requests):
        if item.custom_id in first_index:
            raise ApiError(
                "invalid_request_error",
                f"requests.{index}.custom_id: {item.custom_id!r} is already used by requests."
                f"{first_index[item.custom_id]}; each custom_id must be unique within the batch",
            )
        first_index[item.custom_id] = index
    return parsed


def _batch_prompt(request: Request, version: str, index: int, params: dict[str, Any]) -> tuple[Prompt, str]:
    """Validate one request's ``params`` as a whole ``/v1/messages`` body (stricter than the API,
    which may report some of these only as an ``errored`` result: the whole create is refused with
    a 400 naming the request). Return its prompt and canonical model id."""
    where = f"requests.{index}.params"
    # https://platform.claude.com/docs/en/api/messages/batches/create (params are
    # MessageCreateParamsNonStreaming: ``stream`` may only be false)
    if params.get("stream") is True:
        raise ApiError(
            "invalid_request_error", f"{where}.stream: streaming is not supported in Message Batches"
        )
    try:
        entry = catalogue_of(request).resolve(peek_model(params) or "")
        prompt = parse_messages_request(params, version, entry)
        entry = catalogue_of(request).resolve(prompt.model)
        if entry is None or entry.lifecycle == "retired":
            raise InvalidRequest(f"model: {prompt.model} was not found")
        check_against_model(prompt, entry, entry.id)
    except InvalidRequest as exc:
        raise ApiError("invalid_request_error", f"{where}.{exc}") from None
    # https://platform.claude.com/docs/en/build-with-claude/batch-processing ("max_tokens of at least
    # 1. max_tokens: 0 (cache pre-warming) is not supported inside a batch")
    if prompt.max_tokens < 1:
        raise ApiError("invalid_request_error", f"{where}.max_tokens: must be at least 1 in a Message Batch")
    return prompt, entry.id


def _batch_item(
    request: Request,
    custom_id: str,
    prompt: Prompt,
    model_id: str,
    fault: Fault,
    done_at: float,
    deadline: float,
) -> BatchItem:
    """How one batch request ends, by its fault (see :mod:`tierq.sim.faults`)."""
    state, config = state_of(request), config_of(request)
    if fault.kind in BATCH_ONLY_FAULTS:
        return BatchItem(custom_id, "expired", deadline)
    failed = fault_error(fault, retry_after_s=config.retry_after_s, rate_headers={})
    if fault.kind == "midstream":
        failed = ApiError("overloaded_error", "Overloaded")
    if failed is not None:
        # the errored result's ``error`` is an ErrorResponse, the body of the API's HTTP errors
        error = error_body(failed.error_type, failed.message, details=failed.details)
        return BatchItem(custom_id, "errored", done_at, error=error)
    if fault.kind == "stall":
        done_at += fault.arg if fault.arg is not None else config.stall_s
    entry = catalogue_of(request).resolve(model_id)
    plan = state.cache.plan(prompt, model_id, entry.min_cacheable_tokens if entry is not None else 0)
    state.cache.commit(plan)
    reply = build_any_reply(prompt, plan, fault, config)
    message = reply.message()
    # a batch request runs on the batch tier (SDK ``Usage.service_tier``: "If the request used the
    # priority, standard, or batch tier"); token counts are those of a normal call
    message["usage"] = {**message["usage"], "service_tier": "batch"}
    return BatchItem(custom_id, "succeeded", done_at, message=message)


def _results_base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def create_batch(request: Request) -> Response:
    """``POST /v1/messages/batches``: body size (413 over 256 MB), version, key, JSON, the batch
    limits and every request's ``params`` (400 naming the first bad one); then each request draws its
    fault and its outcome is worked out."""
    state, config = state_of(request), config_of(request)
    store: BatchStore = state.batches
    try:
        raw = await read_body(request, MAX_BATCH_BYTES)
        version = check_version(request)
        check_api_key(request)
        body = _batch_body(parse_json(raw))
        checked = [
            (item.custom_id, *_batch_prompt(request, version, index, item.params))
            for index, item in enumerate(body.requests)
        ]
        # drawn only once the whole batch is accepted, so a refused batch consumes no script
        faults = [state.next_fault(custom_id) for custom_id, _, _ in checked]
    except ApiError as exc:
        return fail(request, exc, None)
    now = store.clock()
    scale = config.time_scale
    deadline = now + BATCH_EXPIRY_S * scale
    items = tuple(
        _batch_item(
            request,
            custom_id,
            prompt,
            model_id,
            fault,
            now + (BATCH_BASE_S + (index + 1) * BATCH_PER_REQUEST_S) * scale,
            deadline,
        )
        for index, ((custom_id, prompt, model_id), fault) in enumerate(zip(checked, faults, strict=True))
    )
    batch = Batch(
        id=store.new_id(),
        created_at=now,
        deadline=deadline,
        items=items,
        time_scale=scale,
        order_seed=uuid.uuid4().int,
    )
    store.add(batch)
    return JSONResponse(batch.as_dict(now, _results_base(request), fresh=True))


def _known_batch(request: Request) -> Batch:
    """The batch the path names; unknown (or deleted) is 404 ``not_found_error``."""
    batch_id: str = request.path_params["batch_id"]
    batch = state_of(request).batches.get(batch_id)
    if batch is None:
        raise ApiError("not_found_error", f"message_batch_id: no Message Batch with id {batch_id!r}")
    return batch


def _checked(request: Request) -> None:
    check_version(request)
    check_api_key(request)


async def get_batch(request: Request) -> Response:
    """``GET /v1/messages/batches/{id}``."""
    try:
        _checked(request)
        batch = _known_batch(request)
    except ApiError as exc:
        return fail(request, exc, None)
    store: BatchStore = state_of(request).batches
    return JSONResponse(batch.as_dict(store.clock(), _results_base(request)))


async def list_batches(request: Request) -> Response:
    """``GET /v1/messages/batches``: most recently created first, paginated as ``/v1/models``
    (https://platform.claude.com/docs/en/api/messages/batches/list: ``limit`` 1 to 1000, default 20,
    ``after_id``, ``before_id``)."""
    try:
        _checked(request)
        try:
            query = PageQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise pydantic_error(exc) from None
        store: BatchStore = state_of(request).batches
        batches = store.newest_first()
        begin, end, has_more = page_slice([b.id for b in batches], query, "Message Batch")
        chosen = batches[begin:end]
    except ApiError as exc:
        return fail(request, exc, None)
    now, base = store.clock(), _results_base(request)
    return JSONResponse(
        {
            "data": [b.as_dict(now, base) for b in chosen],
            "first_id": chosen[0].id if chosen else None,
            "last_id": chosen[-1].id if chosen else None,
            "has_more": has_more,
        }
    )


async def cancel_batch(request: Request) -> Response:
    """``POST /v1/messages/batches/{id}/cancel`` (https://platform.claude.com/docs/en/api/messages/batches/cancel):
    an ``in_progress`` batch becomes ``canceling``; a ``canceling`` one is answered as it is; an
    ``ended`` one is refused with 400 (stricter: the API may answer it unchanged)."""
    store: BatchStore = state_of(request).batches
    try:
        _checked(request)
        batch = _known_batch(request)
        now = store.clock()
        if batch.status(now) == "ended":
            raise ApiError(
                "invalid_request_error", f"Message Batch {batch.id} has ended and can no longer be canceled"
            )
        store.cancel(batch.id, now)
    except ApiError as exc:
        return fail(request, exc, None)
    return JSONResponse(batch.as_dict(now, _results_base(request)))


async def delete_batch(request: Request) -> Response:
    """``DELETE /v1/messages/batches/{id}`` (https://platform.claude.com/docs/en/api/messages/batches/delete:
    "Message Batches can only be deleted once they've finished processing"; otherwise 400)."""
    store: BatchStore = state_of(request).batches
    try:
        _checked(request)
        batch = _known_batch(request)
        if batch.status(store.clock()) != "ended":
            raise ApiError(
                "invalid_request_error",
                f"Message Batch {batch.id} is still processing; cancel it and wait for it to end "
                "before deleting it",
            )
        store.delete(batch.id)
    except ApiError as exc:
        return fail(request, exc, None)
    return JSONResponse({"id": batch.id, "type": "message_batch_deleted"})


async def batch_results(request: Request) -> Response:
    """``GET /v1/messages/batches/{id}/results`` (https://platform.claude.com/docs/en/api/messages/batches/results):
    one ``MessageBatchIndividualResponse`` per line, only once the batch has ended ("Results ...
    are not available until processing of the entire batch ends",
    https://platform.claude.com/docs/en/build-with-claude/batch-processing); before, 400."""
    store: BatchStore = state_of(request).batches
    try:
        _checked(request)
        batch = _known_batch(request)
        status = batch.status(store.clock())
        if status != "ended":
            raise ApiError(
                "invalid_request_error",
                f"Message Batch {batch.id} has not ended (processing_status: {status}); "
                "its results are not available yet",
            )
    except ApiError as exc:
        return fail(request, exc, None)
    lines = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in batch.results())
    return Response(lines.encode(), media_type="application/binary")
