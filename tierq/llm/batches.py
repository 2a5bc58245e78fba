"""The Message Batches API through the SDK: create a batch, look at it, read its results.

https://platform.claude.com/docs/en/api/messages/batches: every request of a batch is a Messages
request without ``stream``, identified by its ``custom_id``; a batch ends within 24 hours, its
results then come as JSON lines in no particular order, each ``succeeded`` (a Message),
``errored`` (an error response), ``canceled`` or ``expired``.

A create is sent once (the SDK's own retries are off here): if its answer is lost, the batch may
exist all the same, and the caller looks for it (:meth:`BatchAPI.recent`) before sending another.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import anthropic
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from tierq.contract.errors import (
    LLMError,
    OverloadedError,
    RateLimitedError,
    RequestRejectedError,
    UpstreamServerError,
)
from tierq.contract.result import Usage
from tierq.llm.client import LLMRequest, map_sdk_error, message_params

__all__ = ["BatchAPI", "BatchOutcome", "BatchReply", "BatchState", "batch_params", "request_size"]

#: seconds one call to the batch endpoints may take (a create carries up to 256 MB)
CALL_TIMEOUT_S = 120.0
#: batches listed per page when looking for one whose create answer was lost
LIST_PAGE = 100


def batch_params(request: LLMRequest) -> dict[str, Any]:
    """The Messages parameters of one batch request (no ``stream``: a batch takes none)."""
    return {
        "model": request.model,
        "max_tokens": request.max_tokens,
        **message_params(request),
        **({} if request.effort is None else {"output_config": {"effort": request.effort}}),
    }


def request_size(custom_id: str, request: LLMRequest) -> int:
    """Bytes of one batch request as JSON, as it counts toward the batch's 256 MB: at most, with
    whatever prompt-cache breakpoints it is sent with."""
    marked = dataclasses.replace(request, cache_system=True, cache_instructions=True)
    body = {"custom_id": custom_id, "params": batch_params(marked)}
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())


@dataclass(frozen=True, slots=True)
class BatchState:
    """A batch as the API reports it."""

    api_id: str
    status: Literal["in_progress", "canceling", "ended"]
    created_at: float
    #: requests in it, whatever their state
    requests: int

    @classmethod
    def of(cls, batch: MessageBatch) -> BatchState:
        counts = batch.request_counts
        total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
        return cls(batch.id, batch.processing_status, batch.created_at.timestamp(), total)


@dataclass(frozen=True, slots=True)
class BatchReply:
    """One request's Message."""

    text: str
    model: str
    stop_reason: str | None
    usage: Usage
    message_id: str
    #: ``stop_details`` of a refusal: its category and explanation
    refusal: tuple[str | None, str | None] | None = None


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """How one request of a batch ended: ``reply`` when it succeeded, ``error`` when it errored."""

    custom_id: str
    kind: Literal["succeeded", "errored", "canceled", "expired"]
    reply: BatchReply | None = None
    error: LLMError | None = None


class BatchAPI:
    """The batch endpoints, on a client of the worker's (its retries turned off: see the module)."""

    def __init__(self, client: anthropic.Anthropic) -> None:
        self._client = client.with_options(max_retries=0, timeout=CALL_TIMEOUT_S)

    def create(self, requests: list[tuple[str, LLMRequest]]) -> BatchState:
        """Submit one batch; an :class:`~tierq.contract.errors.LLMError` when the API refused it or did
        not answer."""
        body = [{"custom_id": custom_id, "params": batch_params(r)} for custom_id, r in requests]
        try:
            batch = self._client.messages.batches.create(requests=body)  # type: ignore[arg-type]
        except anthropic.APIError as exc:
            raise map_sdk_error(exc, produced_text=False) from exc
        return BatchState.of(batch)

    def retrieve(self, api_id: str) -> BatchState:
        """The batch's state now."""
        try:
            return BatchState.of(self._client.messages.batches.retrieve(api_id))
        except anthropic.APIError as exc:
            raise map_sdk_error(exc, produced_text=False) from exc

    def recent(self, since: float) -> list[BatchState]:
        """Batches created at or after ``since`` (epoch seconds), newest first."""
        found: list[BatchState] = []
        try:
            page = self._client.messages.batches.list(limit=LIST_PAGE)
            for batch in page:
                state = BatchState.of(batch)
                if state.created_at < since:
                    break
                found.append(state)
        except anthropic.APIError as exc:
            raise map_sdk_error(exc, produced_text=False) from exc
        return found

    def results(self, api_id: str) -> Iterator[BatchOutcome]:
        """Each request's outcome, as the results file lists them."""
        try:
            for line in self._client.messages.batches.results(api_id):
                yield _outcome(line)
        except anthropic.APIError as exc:
            raise map_sdk_error(exc, produced_text=False) from exc


def _outcome(line: MessageBatchIndividualResponse) -> BatchOutcome:
    result = line.result
    if result.type == "succeeded":
        message = result.message
        text = "".join(block.text for block in message.content if block.type == "text")
        refusal = None
        if message.stop_reason == "refusal":
            details = getattr(message, "stop_details", None)
            refusal = (
                _bounded(getattr(details, "category", None)),
                _bounded(getattr(details, "explanation", None)),
            )
        return BatchOutcome(
            line.custom_id,
            "succeeded",
            reply=BatchReply(
                text=text,
                model=message.model,
                stop_reason=message.stop_reason,
                usage=Usage.from_api(message.usage.model_dump()),
                message_id=message.id,
                refusal=refusal,
            ),
        )
    if result.type == "errored":
        return BatchOutcome(line.custom_id, "errored", error=_error(result.error))
    return BatchOutcome(line.custom_id, result.type)


def _error(response: Any) -> LLMError:
    """An errored request's error response, as tierq's error (retryable or not, by the API's type)."""
    kind = str(getattr(response.error, "type", "") or "")
    message = _bounded(getattr(response.error, "message", None)) or ""
    label = f"batch request errored: {kind}: {message}".rstrip(": ")
    request_id = getattr(response, "request_id", None)
    if kind == "rate_limit_error":
        return RateLimitedError(label, 429, request_id)
    if kind == "overloaded_error":
        return OverloadedError(label, 529, request_id)
    if kind in ("api_error", "timeout_error", "gateway_timeout_error"):
        return UpstreamServerError(label, 500, request_id)
    return RequestRejectedError(label, 400, request_id)


def _bounded(value: object, limit: int = 500) -> str | None:
    return value[:limit] if isinstance(value, str) else None
