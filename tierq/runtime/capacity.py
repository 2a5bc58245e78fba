"""A call's share of the model's rate limit: taken before the request is sent, settled after.

The estimate is the request itself (``max_tokens`` of output, as the API charges at the start) and
its prompt's characters over :data:`CHARS_PER_TOKEN`. A tier reserves above its floor: the shares
more urgent tiers on the same model keep (``TierTable.floor``). A job waits for capacity in its
thread for at most its tier's ``rate_limit_wait_s`` and :data:`WAIT_SHARE` of the time its deadline
left it; a longer wait raises :class:`~tierq.contract.errors.CapacityWaitError`, and the job goes back to its
queue with the wait the limiter named as its countdown (no thread held, no retry spent) or, when its
deadline would pass first, ends rate limited. The limiter's Redis being away never fails a job: the
call goes out unmetered and a warning says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import redis

from tierq.contract.errors import CapacityWaitError, RateLimitedError, RequestRejectedError
from tierq.core.tokens import estimate_tokens
from tierq.llm.client import LLMReply, LLMRequest
from tierq.observe import metrics
from tierq.observe.logging import get_logger
from tierq.store.ratelimit import FairShare, Reservation, SharedRateLimiter

__all__ = [
    "MIN_REQUEUE_S",
    "WAIT_SHARE",
    "give_back",
    "release",
    "reservation_of",
    "reserving",
    "settle",
    "take",
]

#: share of the time left before its deadline that a job may spend waiting for capacity in its thread
WAIT_SHARE = 0.25
#: the shortest countdown a job goes back to its queue with to wait for capacity (no requeue storm)
MIN_REQUEUE_S = 0.25

_log = get_logger("tierq.ratelimit")


def estimate_input_tokens(request: LLMRequest) -> int:
    """The prompt's input tokens: as the API counted them, else estimated from its characters."""
    if request.input_tokens is not None:
        return request.input_tokens
    return estimate_tokens(len(request.system or "") + request.user_chars)


def reserving(
    limiter: SharedRateLimiter | None,
    request: LLMRequest,
    floor: float = 0.0,
    share: FairShare | None = None,
) -> Callable[[redis.client.Pipeline], None] | None:
    """What adds the call's first reserve to a round trip made anyway (the run guard's)."""
    if limiter is None:
        return None
    estimate = estimate_input_tokens(request)
    return lambda pipe: limiter.queue_reserve(pipe, request.model, estimate, request.max_tokens, floor, share)


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
    *,
    floor: float = 0.0,
    wait_s: float = 0.0,
    share: FairShare | None = None,
) -> tuple[Reservation | None, float]:
    """Reserve the call's capacity above ``floor``, waiting in this thread for at most ``wait_s``
    and :data:`WAIT_SHARE` of the time left before ``deadline``; ``first``: a reserve already made
    (by :func:`reserving`); ``share``: the job's tier and producer, for the producers' fair share.
    Returns the reservation (None: not metered) and the seconds waited.

    Raises:
        CapacityWaitError: no capacity within that wait (``retry_after``: when there will be).
        RequestRejectedError: the request alone exceeds the share of the model's limit per minute
            the tier may use.
    """
    if limiter is None:
        return None, 0.0
    estimate = estimate_input_tokens(request)
    started = time.monotonic()
    budget_until = started + min(wait_s, max(0.0, deadline - time.time()) * WAIT_SHARE)
    reservation = first
    while True:
        if reservation is None:
            try:
                reservation = limiter.reserve(request.model, estimate, request.max_tokens, floor, share)
            except redis.RedisError as exc:
                _log.warning("ratelimit.unavailable", model=request.model, error=str(exc)[:200])
                return None, time.monotonic() - started
        if reservation.granted:
            return reservation, time.monotonic() - started
        if math.isinf(reservation.wait_s):
            kept = f" ({1 - floor:.0%} of it: more urgent tiers keep the rest)" if floor else ""
            raise RequestRejectedError(
                f"the request ({estimate} input tokens estimated, max_tokens {request.max_tokens}) "
                f"exceeds {request.model}'s rate limit per minute{kept}"
            )
        if time.monotonic() + reservation.wait_s > budget_until:
            tier = share.tier if share is not None else ""
            metrics.observe_capacity_wait(tier)
            try:
                limiter.count(tier, "waits")
            except redis.RedisError as exc:
                _log.warning("ratelimit.unavailable", model=request.model, error=str(exc)[:200])
            raise CapacityWaitError(
                f"rate limit of {request.model} (shared): capacity in {reservation.wait_s:.2f} s",
                retry_after=round(max(MIN_REQUEUE_S, reservation.wait_s), 3),
            )
        time.sleep(reservation.wait_s)
        reservation = None


def settle(
    limiter: SharedRateLimiter | None,
    reservation: Reservation | None,
    reply: LLMReply,
    tier: str,
    model: str,
    queue_wait_ms: float | None = None,
) -> None:
    """Count the call (and its job's ``queue_wait_ms``, on a first attempt); lower the buckets to
    what the API says is left and give back what the call did not use."""
    usage = reply.usage
    used = (usage.input_tokens + usage.cache_creation_input_tokens, usage.output_tokens)
    metrics.observe_call(tier, model, _reserved(reservation), used)
    if limiter is None or reservation is None:
        return
    try:
        limiter.finish(reservation, tier, used[0], used[1], reply.rate_limits, queue_wait_ms=queue_wait_ms)
    except redis.RedisError as exc:
        _log.warning("ratelimit.unavailable", model=model, error=str(exc)[:200])


def give_back(
    limiter: SharedRateLimiter | None,
    reservation: Reservation | None,
    exc: BaseException,
    tier: str,
    model: str,
) -> None:
    """Count the failed call; its tokens go back (the request still counts); a 429 holds the model
    for its ``retry-after`` (a second when it names none)."""
    hold = (exc.retry_after or 1.0) if isinstance(exc, RateLimitedError) else None
    metrics.observe_call(tier, model, _reserved(reservation), (0, 0), rate_limited=hold is not None)
    if limiter is None or reservation is None:
        return
    try:
        limiter.finish(reservation, tier, rate_limited_s=hold)
    except redis.RedisError as error:
        _log.warning("ratelimit.unavailable", model=model, error=str(error)[:200])


def _reserved(reservation: Reservation | None) -> tuple[int, int]:
    return (0, 0) if reservation is None else (reservation.input_tokens, reservation.output_tokens)
