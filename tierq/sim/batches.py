"""Message Batches: the batches the simulator holds, how long they take, and how each request ends.

A batch is worked out whole when it is created (each request's outcome, its Message or error, and
the time it is done); its status is then read off the clock (``SimState.clock``, so tests can
inject a fake one) whenever it is asked for. Nothing runs in the background.

Timing, scaled by ``SimConfig.time_scale`` (``--time-scale``; 0 makes every batch end at once):
request ``i`` (0-based) is done :data:`BATCH_BASE_S` + ``(i + 1)`` * :data:`BATCH_PER_REQUEST_S`
after creation, so at real speed 10 requests take about 2 minutes, 1,000 about 6 minutes and the
largest batch (100,000) about 7 hours: "most batches finish in less than 1 hour", at most 24 hours
(https://platform.claude.com/docs/en/build-with-claude/batch-processing). A request still not done
:data:`BATCH_EXPIRY_S` (scaled) after creation ends ``expired``. ``expires_at`` itself is reported
unscaled, 24 h after ``created_at``, as the API documents it
(https://platform.claude.com/docs/en/api/messages/batches/retrieve, ``expires_at``).

Cancel (https://platform.claude.com/docs/en/api/messages/batches/cancel): the batch is ``canceling``
for :data:`CANCEL_DRAIN_S` (scaled), then ``ended``; requests done before the cancel keep their
outcome, the others end ``canceled``.

``request_counts`` (https://platform.claude.com/docs/en/api/messages/batches/retrieve): every
request counts as ``processing`` until the whole batch has ended; then each is tallied by outcome.
Results come in an order unrelated to the requests' ("Results in the file are not guaranteed to be
in the same order as requests"): the simulator shuffles them, so a client must match by ``custom_id``.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "BATCH_BASE_S",
    "BATCH_EXPIRY_S",
    "BATCH_PER_REQUEST_S",
    "CANCEL_DRAIN_S",
    "CUSTOM_ID_PATTERN",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_REQUESTS",
    "Batch",
    "BatchItem",
    "BatchStore",
    "Outcome",
]

#: Most requests in one batch (https://platform.claude.com/docs/en/build-with-claude/batch-processing,
#: "Batch limitations": "limited to either 100,000 Message requests or 256 MB in size, whichever is
#: reached first").
MAX_BATCH_REQUESTS: Final = 100_000
#: Largest ``POST /v1/messages/batches`` body (same source, and
#: https://platform.claude.com/docs/en/api/errors, "Request size limits": Message Batches API 256 MB);
#: read as 256 * 10^6 bytes, the stricter of the two readings of "MB". Larger is 413.
MAX_BATCH_BYTES: Final = 256_000_000
#: ``custom_id`` (https://platform.claude.com/docs/en/api/messages/batches/create): unique within
#: the batch, 1 to 64 letters, digits, ``_`` or ``-``.
CUSTOM_ID_PATTERN: Final = r"^[a-zA-Z0-9_-]{1,64}$"
#: Seconds (scaled) before the first request of a batch is done: queueing and start-up.
BATCH_BASE_S: Final = 120.0
#: Seconds (scaled) each further request adds.
BATCH_PER_REQUEST_S: Final = 0.25
#: A batch expires 24 hours after creation (https://platform.claude.com/docs/en/api/messages/batches/create,
#: ``expires_at``); requests not done by then end ``expired``. Scaled for processing.
BATCH_EXPIRY_S: Final = 24 * 3600.0
#: Seconds (scaled) a ``canceling`` batch takes to end.
CANCEL_DRAIN_S: Final = 30.0

Outcome = Literal["succeeded", "errored", "expired", "canceled"]
Status = Literal["in_progress", "canceling", "ended"]
_OUTCOMES: Final[tuple[Outcome, ...]] = ("succeeded", "errored", "canceled", "expired")


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch, worked out at creation."""

    custom_id: str
    #: what it ends as when nothing cuts it short (``succeeded``, ``errored`` or ``expired``)
    outcome: Outcome
    #: clock time it is done (an ``expired`` one: the batch's processing deadline)
    done_at: float
    #: the Message of a ``succeeded`` request, the error body of an ``errored`` one
    message: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass
class Batch:
    """A Message Batch: its requests, and the times that decide its status."""

    id: str
    created_at: float
    #: clock time processing is cut off (created + 24 h, scaled)
    deadline: float
    items: tuple[BatchItem, ...]
    time_scale: float
    cancel_at: float | None = None
    order_seed: int = 0

    def _natural_end(self) -> float:
        return max((min(i.done_at, self.deadline) for i in self.items), default=self.created_at)

    def ended_at(self) -> float:
        """Clock time processing ends (or ended)."""
        end = self._natural_end()
        if self.cancel_at is not None:
            end = min(end, self.cancel_at + CANCEL_DRAIN_S * self.time_scale)
        return end

    def status(self, now: float) -> Status:
        if now >= self.ended_at():
            return "ended"
        return "canceling" if self.cancel_at is not None else "in_progress"

    def outcome(self, item: BatchItem) -> Outcome:
        """How ``item`` ends (meaningful once the batch has ended)."""
        if item.done_at > self.deadline:
            return "expired"
        if self.cancel_at is not None and item.done_at > self.cancel_at:
            return "canceled"
        return item.outcome

    def as_dict(self, now: float, results_base: str, *, fresh: bool = False) -> dict[str, Any]:
        """The ``MessageBatch`` object at clock time ``now``; ``fresh``: as the create call answers
        (``in_progress``, whatever the time scale)."""
        status: Status = "in_progress" if fresh else self.status(now)
        counts = dict.fromkeys(("processing", *_OUTCOMES), 0)
        if status == "ended":
            for item in self.items:
                counts[self.outcome(item)] += 1
        else:
            counts["processing"] = len(self.items)
        ended = status == "ended"
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": _rfc3339(self.ended_at()) if ended else None,
            "created_at": _rfc3339(self.created_at),
            "expires_at": _rfc3339(self.created_at + BATCH_EXPIRY_S),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(self.cancel_at) if self.cancel_at is not None else None,
            "results_url": f"{results_base}/v1/messages/batches/{self.id}/results" if ended else None,
        }

    def results(self) -> list[dict[str, Any]]:
        """One ``MessageBatchIndividualResponse`` per request, in a shuffled order."""
        lines: list[dict[str, Any]] = []
        for item in self.items:
            outcome = self.outcome(item)
            result: dict[str, Any] = {"type": outcome}
            if outcome == "succeeded":
                result["message"] = item.message
            elif outcome == "errored":
                result["error"] = item.error
            lines.append({"custom_id": item.custom_id, "result": result})
        random.Random(self.order_seed).shuffle(lines)
        return lines


class BatchStore:
    """Every batch created (deleted ones are forgotten), behind one lock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._batches: dict[str, Batch] = {}

    @staticmethod
    def new_id() -> str:
        """A fresh batch id, ``msgbatch_sim_<hex>``."""
        return f"msgbatch_sim_{uuid.uuid4().hex[:24]}"

    def add(self, batch: Batch) -> None:
        with self._lock:
            self._batches[batch.id] = batch

    def get(self, batch_id: str) -> Batch | None:
        with self._lock:
            return self._batches.get(batch_id)

    def newest_first(self) -> list[Batch]:
        """Every batch, most recently created first (by creation order, so equal clock times keep it)."""
        with self._lock:
            return list(reversed(self._batches.values()))

    def cancel(self, batch_id: str, now: float) -> Batch | None:
        """Start canceling ``batch_id`` (once); ``None`` when there is no such batch."""
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is not None and batch.cancel_at is None and batch.status(now) == "in_progress":
                batch.cancel_at = now
            return batch

    def delete(self, batch_id: str) -> bool:
        with self._lock:
            return self._batches.pop(batch_id, None) is not None

    def summary(self) -> list[dict[str, Any]]:
        """``[{"id", "processing_status", "requests", "cancel_initiated", "custom_ids"}]``, newest first."""
        now = self.clock()
        return [
            {
                "id": b.id,
                "processing_status": b.status(now),
                "requests": len(b.items),
                "cancel_initiated": b.cancel_at is not None,
                "custom_ids": [item.custom_id for item in b.items],
            }
            for b in self.newest_first()
        ]

    def reset(self) -> None:
        with self._lock:
            self._batches.clear()
