"""A call's share of the model's rate limit: taken before the request is sent, settled after.

The estimate is the request itself (``max_tokens`` of output, as the API charges at the start) and
its prompt's characters over :data:`CHARS_PER_TOKEN`. A job waits for capacity in its thread for at
most :data:`WAIT_SHARE` of the time its deadline left it, and :data:`WAIT_MAX_S`; past that it fails
as rate limited, and Celery's retry brings it back after the wait the limiter named (it waits in the
queue, not in a thread; the retry counts against the tier's ``max_retries``, as an API 429's
does). The limiter's Redis being away never fails a job: the call goes out unmetered and a
warning says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import redis

from tasks.errors import RateLimitedError, RequestRejectedError
from worker.llm.client import LLMReply, LLMRequest
from worker.observe.logging import get_logger
from worker.store.ratelimit import Reservation, SharedRateLimiter

__all__ = [
    "CHARS_PER_TOKEN",
    "WAIT_MAX_S",
    "WAIT_SHARE",
    "give_back",
    "release",
    "reservation_of",
    "reserving",
    "settle",
    "take",
]

#: characters per input token for the estimate (English prose runs ~4; fewer overestimates,
#: which holds capacity back only until the call settles)
CHARS_PER_TOKEN = 3.5
#: share of the time left before its deadline that a job may spend waiting for capacity
WAIT_SHARE = 0.25
#: seconds a job waits for capacity in its thread at most (a slow tier's quarter is minutes): a
#: longer wait goes back to the queue with the countdown the limiter named, freeing the thread
WAIT_MAX_S = 30.0

_log = get_logger("tierq.ratelimit")


def estimate_input_tokens(request: LLMRequest) -> int:
    """The prompt's input tokens, estimated from its characters."""
    return math.ceil((len(request.system or "") + len(request.prompt)) / CHARS_PER_TOKEN)


def reserving(
    limiter: SharedRateLimiter | None, request: LLMRequest
) -> Callable[[redis.client.Pipeline], None] | None:
    """What adds the call's first reserve to a round trip made anyway (the run guard's)."""
    if limiter is None:
        return None
    estimate = estimate_input_tokens(request)
    return lambda pipe: limiter.queue_reserve(pipe, request.model, estimate, request.max_tokens)


def reservation_of(
    limiter: SharedRateLimiter | None, request: LLMRequest, replies: tuple[object, ...]
) -> Reservation | None:
    """The reservation a :func:`reserving` round trip made (None without a limiter or a reply)."""
    if limiter is None or not replies:
        return None
    return limiter.reservation(request.model, estimate_input_tokens(request), request.max_tokens, replies[0])


def release(limiter: SharedRateLimiter | None, reservation: Reservation | None) -> None:
    """Give back a reservation whose call will not be made."""
    if limiter is None or reservation is None:
        return
    try:
        limiter.release(reservation)
    except redis.RedisError as exc:
        _log.warning("ratelimit.unavailable", model=reservation.model, error=str(exc)[:200])


def take(
    limiter: SharedRateLimiter | None,
    request: LLMRequest,
    deadline: float,
    first: Reservation | None = None,
) -> Reservation | None:
    """Reserve the call's capacity, waiting for it within the job's share of its deadline;
    ``first``: a reserve already made (by :func:`reserving`).

    Raises:
        RateLimitedError: no capacity within that share (``retry_after``: when there will be).
        RequestRejectedError: the request alone exceeds the model's limit per minute.
    """
    if limiter is None:
        return None
    estimate = estimate_input_tokens(request)
    budget_until = time.time() + min(WAIT_MAX_S, max(0.0, deadline - time.time()) * WAIT_SHARE)
    reservation = first
    while True:
        if reservation is None:
            try:
                reservation = limiter.reserve(request.model, estimate, request.max_tokens)
            except redis.RedisError as exc:
                _log.warning("ratelimit.unavailable", model=request.model, error=str(exc)[:200])
                return None
        if reservation.granted:
            return reservation
        if math.isinf(reservation.wait_s):
            raise RequestRejectedError(
                f"the request ({estimate} input tokens estimated, max_tokens {request.max_tokens}) "
                f"exceeds {request.model}'s rate limit per minute"
            )
        if time.time() + reservation.wait_s > budget_until:
            raise RateLimitedError(
                f"rate limit of {request.model}: capacity in {reservation.wait_s:.1f} s",
                retry_after=reservation.wait_s,
            )
        time.sleep(reservation.wait_s)
        reservation = None


def settle(limiter: SharedRateLimiter | None, reservation: Reservation | None, reply: LLMReply) -> None:
    """Lower the buckets to what the API says is left; give back what the call did not use."""
    if limiter is None or reservation is None:
        return
    usage = reply.usage
    try:
        # the headers came as the response started, with max_tokens charged: lower to them first,
        # then give back what the call did not use
        limiter.correct(reservation.model, reply.rate_limits)
        limiter.settle(
            reservation, usage.input_tokens + usage.cache_creation_input_tokens, usage.output_tokens
        )
    except redis.RedisError as exc:
        _log.warning("ratelimit.unavailable", model=reservation.model, error=str(exc)[:200])


def give_back(limiter: SharedRateLimiter | None, reservation: Reservation | None, exc: BaseException) -> None:
    """After a failed call: its tokens go back (the request still counts); a 429 holds the model
    for its ``retry-after`` (a second when it names none)."""
    if limiter is None or reservation is None:
        return
    try:
        limiter.settle(reservation, 0, 0)
        if isinstance(exc, RateLimitedError):
            limiter.block(reservation.model, exc.retry_after or 1.0)
    except redis.RedisError as error:
        _log.warning("ratelimit.unavailable", model=reservation.model, error=str(error)[:200])
