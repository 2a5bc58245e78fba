"""Fault injection: the failures the simulator can play, and how each one answers.

A fault is written as ``KIND`` or ``KIND:ARG``:

``ok``
    no fault.
``429`` / ``429:SECONDS``
    HTTP 429 ``rate_limit_error`` with ``retry-after`` (default ``SimConfig.retry_after_s``)
    and ``anthropic-ratelimit-*`` headers showing the requests and tokens exhausted until then.
``529``
    HTTP 529 ``overloaded_error``.
``500``
    HTTP 500 ``api_error``.
``400``
    HTTP 400 ``invalid_request_error``.
``401``
    HTTP 401 ``authentication_error``.
``midstream`` / ``midstream:N``
    HTTP 200, the stream starts, sends N text deltas (default 2; 0 means before the first one),
    then an SSE ``error`` event with ``overloaded_error`` and ends. A non-streaming request
    gets a 529 instead.
``stall`` / ``stall:SECONDS``
    HTTP 200, the stream sends ``message_start``, ``content_block_start`` and ``ping``, then
    nothing for SECONDS (default ``SimConfig.stall_s``, not scaled by ``time_scale``; no pings
    either: a stall is a dead connection), then goes on normally. A non-streaming request waits
    as long before its answer.
``spend_limit``
    HTTP 429 ``rate_limit_error`` with ``error.details.error_code: "enforced_spend_limit_reached"``,
    ``x-should-retry: false`` and no ``retry-after``: the organization's monthly spend limit
    (https://platform.claude.com/docs/en/api/rate-limits, "Spend limits").
``refusal`` / ``refusal:N``
    HTTP 200; the text stops after N text deltas (default ``SimConfig.midstream_deltas``) and the
    message ends with ``stop_reason: "refusal"`` and ``stop_details`` (type, category,
    explanation). A non-streaming request gets the same cut text and stop reason.
``unknown_event``
    HTTP 200, a normal stream with events of a type clients do not know (``event: future_event``)
    after ``message_start`` and between text deltas; clients must ignore them
    (https://platform.claude.com/docs/en/build-with-claude/streaming, "Other events").
    A non-streaming request is answered normally.
``unknown_block``
    HTTP 200; before the text comes a content block of a type clients do not know
    (``future_block``) with its own ``future_delta`` deltas. A non-streaming answer has it in
    ``content`` before the text block.
``expired``
    Message Batches only: the batch request is never processed and ends ``expired`` when the
    batch reaches its 24 h deadline (scaled by ``time_scale``). A ``/v1/messages`` request
    scripted with it is refused with a 400 naming the fault (a scripting mistake).

In a Message Batch (:mod:`tierq.sim.batches`) each request draws its fault when the batch is
created, from the script of its ``custom_id`` (used as the job id), then the global script, then
the probability table: an HTTP-error fault (and ``midstream``) makes it end ``errored`` with that
error's body; ``stall:SECONDS`` delays it (unscaled); ``refusal`` and ``unknown_block`` shape its
Message as they shape a non-streaming answer; ``unknown_event`` changes nothing.

Every HTTP-error fault carries the headers every response has (``request-id``,
``anthropic-ratelimit-*``, ``x-should-retry``) and a top-level ``request_id`` in its body.

Where a request's fault comes from (first match wins): the ``x-sim-fault`` header, the FIFO
script of its job id (header ``x-tierq-job-id``), the global FIFO script, the probability table.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

from tierq.sim.errors import ApiError

__all__ = [
    "BATCH_ONLY_FAULTS",
    "FAULT_HEADER",
    "FAULT_KINDS",
    "HTTP_FAULTS",
    "JOB_HEADER",
    "OK",
    "SPEND_LIMIT_CODE",
    "STREAM_FAULTS",
    "Fault",
    "FaultKind",
    "draw_fault",
    "fault_error",
    "validate_rates",
]

FaultKind = Literal[
    "ok",
    "429",
    "529",
    "500",
    "400",
    "401",
    "midstream",
    "stall",
    "spend_limit",
    "refusal",
    "unknown_event",
    "unknown_block",
    "expired",
]

#: Every fault kind, in the order the module docstring lists them.
FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)

#: Request header naming the fault for this one request.
FAULT_HEADER: Final = "x-sim-fault"
#: Request header carrying the job id that per-job scripts and request counts are keyed by.
JOB_HEADER: Final = "x-tierq-job-id"

#: Kinds answered by an HTTP error before any body: kind -> (status, error type, message).
HTTP_FAULTS: Final[Mapping[str, tuple[int, str, str]]] = {
    "429": (429, "rate_limit_error", "Number of requests has exceeded your rate limit (simulated)."),
    "529": (529, "overloaded_error", "Overloaded"),
    "500": (500, "api_error", "Internal server error"),
    "400": (400, "invalid_request_error", "Invalid request (simulated)."),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "spend_limit": (
        429,
        "rate_limit_error",
        "You have reached your specified API usage limits. You will regain access on the first "
        "day of next month at 00:00 UTC.",
    ),
}

#: Kinds played inside a 200 answer.
STREAM_FAULTS: Final = frozenset({"midstream", "stall", "refusal", "unknown_event", "unknown_block"})

#: Kinds that only a Message Batch request can play.
BATCH_ONLY_FAULTS: Final = frozenset({"expired"})

#: ``error.details.error_code`` of a spend-limit 429.
SPEND_LIMIT_CODE: Final = "enforced_spend_limit_reached"

_ARG_KINDS: Final = frozenset({"429", "midstream", "stall", "refusal"})


@dataclass(frozen=True)
class Fault:
    """One fault to play: its kind and an optional argument (seconds or a delta count)."""

    kind: FaultKind
    arg: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Parse ``KIND`` or ``KIND:ARG``; raise ``ValueError`` when it is not a fault."""
        kind, sep, raw_arg = spec.strip().lower().partition(":")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {spec!r}; expected one of {', '.join(FAULT_KINDS)}")
        if not sep:
            return cls(kind)
        if kind not in _ARG_KINDS:
            raise ValueError(f"fault {kind!r} takes no argument")
        try:
            arg = float(raw_arg)
        except ValueError:
            raise ValueError(f"fault argument must be a number: {spec!r}") from None
        if not math.isfinite(arg) or arg < 0:
            raise ValueError(f"fault argument must be finite and >= 0: {spec!r}")
        return cls(kind, arg)

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg:g}"


#: No fault.
OK: Final = Fault("ok")


def validate_rates(rates: Mapping[str, float]) -> dict[Fault, float]:
    """Check a probability table (fault spec -> probability, summing to at most 1) and parse it."""
    table: dict[Fault, float] = {}
    for spec, probability in rates.items():
        if isinstance(probability, bool) or not isinstance(probability, int | float):
            raise ValueError(f"probability of {spec!r} must be a number")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability of {spec!r} must be within [0, 1]")
        table[Fault.parse(spec)] = float(probability)
    if sum(table.values()) > 1.0 + 1e-9:
        raise ValueError("probabilities must sum to at most 1")
    return table


def draw_fault(rates: Mapping[Fault, float], rng: random.Random) -> Fault:
    """Draw one fault from a validated probability table; ``OK`` for the remaining mass."""
    if not rates:
        return OK
    u = rng.random()
    for fault, probability in rates.items():
        if u < probability:
            return fault
        u -= probability
    return OK


def fault_error(fault: Fault, *, retry_after_s: float, rate_headers: Mapping[str, str]) -> ApiError | None:
    """The HTTP error of ``fault`` (``None`` when it is not an HTTP-error fault).

    ``rate_headers`` are the ``anthropic-ratelimit-*`` headers to send; a ``429`` fault passes
    headers showing the limits exhausted, plus its ``retry-after``.
    """
    if fault.kind not in HTTP_FAULTS:
        return None
    status, error_type, message = HTTP_FAULTS[fault.kind]
    headers = dict(rate_headers)
    details = None
    if fault.kind == "429":
        headers["retry-after"] = f"{fault.arg if fault.arg is not None else retry_after_s:g}"
    elif fault.kind == "spend_limit":
        # No retry-after, and the API says not to retry (issue 9; developersdigest's Anthropic 429 page).
        headers["x-should-retry"] = "false"
        details = {"error_code": SPEND_LIMIT_CODE}
    return ApiError(error_type, message, status=status, headers=headers, details=details)
