"""The retry decision: how long to wait before the next attempt, or why there is none.

Celery's retry is the one retry loop (the SDK's own retries are off); :func:`plan_retry` decides."""

from __future__ import annotations

import random
import time

from tierq.contract.errors import (
    CancelRequestedError,
    CapacityWaitError,
    DeadlineExceededError,
    IdempotencyConflictError,
    InvalidJobError,
    RefusedError,
    RetryableLLMError,
    SpendLimitError,
    StreamInterruptedError,
)
from tierq.runtime.attempt import Attempt, JobRef

__all__ = ["MIN_ATTEMPT_S", "plan_retry"]

#: a retry is planned only if at least this many seconds of the deadline would remain for it
MIN_ATTEMPT_S = 1.0
#: errors no retry can help, and the reason a job that ends with one gives (checked in this order)
_NEVER_RETRIED: tuple[tuple[type[BaseException], str], ...] = (
    (DeadlineExceededError, "expired"),
    (RefusedError, "refused"),
    (SpendLimitError, "spend_limit"),
    (IdempotencyConflictError, "idempotency_conflict"),
    (CancelRequestedError, "cancelled"),
    (InvalidJobError, "invalid job"),
)


def plan_retry(
    exc: BaseException, attempt: Attempt, ref: JobRef, rng: random.Random | None = None
) -> tuple[float | None, str]:
    """Seconds to wait before the next attempt, or None to give up, and why.

    429 waits what ``retry-after`` says; 529, 5xx and connection errors back off exponentially
    with jitter. No retry is planned past the tier's ``max_retries`` or one that could not start
    at least :data:`MIN_ATTEMPT_S` before the deadline.
    """
    for kind, why in _NEVER_RETRIED:
        if isinstance(exc, kind):
            return None, why
    tier = ref.tier if ref.spec is not None else None
    after_text = isinstance(exc, StreamInterruptedError) and tier is not None and tier.retry_after_text
    if not isinstance(exc, RetryableLLMError) and not after_text:
        return None, "not retryable"
    if tier is None:
        return None, "unknown tier"
    capacity_wait = isinstance(exc, CapacityWaitError)
    if attempt.spent_retries >= tier.max_retries and not capacity_wait:
        return None, f"retries exhausted ({tier.max_retries})"
    retry_after = exc.retry_after if isinstance(exc, RetryableLLMError) else None
    if retry_after is not None:
        delay = retry_after
    else:
        ceiling = min(tier.retry_backoff_max_s, tier.retry_backoff_s * 2**attempt.spent_retries)
        delay = (rng or random).uniform(ceiling / 2, ceiling)
    if time.time() + delay + MIN_ATTEMPT_S >= attempt.deadline(tier):
        if capacity_wait:
            return None, "rate_limited"
        return None, "deadline would pass before another attempt"
    return round(delay, 3), "retryable"
