"""Rate limits as the API applies them: per-model token buckets for requests, input and output tokens.

https://platform.claude.com/docs/en/api/rate-limits:

- limits are per model, in requests (RPM), input tokens (ITPM) and output tokens (OTPM) per minute,
  enforced with the token bucket algorithm: capacity refills continuously up to the limit;
- output tokens are estimated from ``max_tokens`` when a request starts and adjusted at its end
  (the simulator charges ``max_tokens`` and refunds what was not used);
- ``cache_read_input_tokens`` do not count toward ITPM; input and cache creation tokens do;
- a 429 carries ``retry-after`` (the simulator's: whole seconds until every bucket this request
  needs holds enough, from the bucket arithmetic, rounded up);
- every response carries ``anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-
  {limit,remaining,reset}``; ``reset`` is when the bucket is full again (RFC 3339), and the
  ``tokens-*`` family shows whichever of the input/output buckets is the most restrictive now
  (the smaller remaining fraction).

Time comes from an injected clock (seconds, ``time.time`` by default) so tests can freeze it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Self

__all__ = ["DEFAULT_LIMITS", "Admission", "Limits", "RateLimited", "RateLimiter", "TokenBucket"]

#: Seconds in which a bucket refills from empty to its limit.
WINDOW_S: Final = 60.0
#: Header prefix of the rate-limit family.
HEADER_PREFIX: Final = "anthropic-ratelimit-"


@dataclass(frozen=True)
class Limits:
    """Per-model limits per minute; the defaults are generous so the test suite never meets them."""

    rpm: int = 4_000
    itpm: int = 2_000_000
    otpm: int = 400_000

    def __post_init__(self) -> None:
        for name in ("rpm", "itpm", "otpm"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def parse(cls, spec: str) -> Self:
        """Parse ``rpm=N,itpm=N,otpm=N`` (any subset; the rest keep their defaults)."""
        values: dict[str, int] = {}
        for part in spec.split(","):
            name, sep, raw = part.strip().partition("=")
            name = name.strip().lower()
            if not sep or name not in ("rpm", "itpm", "otpm"):
                raise ValueError(f"expected rpm=N,itpm=N,otpm=N, got {spec!r}")
            if name in values:
                raise ValueError(f"{name} given twice in {spec!r}")
            try:
                values[name] = int(raw.replace("_", ""))
            except ValueError:
                raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
        return cls(**values)

    def __str__(self) -> str:
        return f"rpm={self.rpm},itpm={self.itpm},otpm={self.otpm}"


DEFAULT_LIMITS: Final = Limits()


class TokenBucket:
    """A bucket of ``capacity`` that refills at ``capacity`` per minute, continuously."""

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.updated = now

    @property
    def rate(self) -> float:
        """Refill per second."""
        return self.capacity / WINDOW_S

    def refill(self, now: float) -> None:
        """Add what flowed in since the last look (never above capacity)."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 when it is now)."""
        if amount <= self.level:
            return 0.0
        return (amount - self.level) / self.rate

    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    def seconds_to_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


class RateLimited(Exception):
    """Raised when a request does not fit its model's buckets; says which and for how long."""

    def __init__(self, message: str, retry_after_s: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers


@dataclass
class Admission:
    """A request let through: what it was charged, so the output estimate can be settled."""

    limiter: RateLimiter
    model: str
    charged_output: int
    settled: bool = False

    def settle(self, output_tokens: int) -> None:
        """Refund the output tokens charged but not used (once)."""
        if self.settled:
            return
        self.settled = True
        self.limiter.refund_output(self.model, max(0, self.charged_output - output_tokens))


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(math.ceil(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimiter:
    """The buckets of every model, behind one lock; created lazily per model id."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, clock: Callable[[], float] | None = None) -> None:
        self.limits = limits
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket, TokenBucket]] = {}

    def _get(self, model: str, now: float) -> tuple[TokenBucket, TokenBucket, TokenBucket]:
        buckets = self._buckets.get(model)
        if buckets is None:
            buckets = (
                TokenBucket(self.limits.rpm, now),
                TokenBucket(self.limits.itpm, now),
                TokenBucket(self.limits.otpm, now),
            )
            self._buckets[model] = buckets
        for bucket in buckets:
            bucket.refill(now)
        return buckets

    def _headers(self, buckets: tuple[TokenBucket, TokenBucket, TokenBucket], now: float) -> dict[str, str]:
        requests, inputs, outputs = buckets
        tighter = min((inputs, outputs), key=lambda b: b.level / b.capacity)
        headers: dict[str, str] = {}
        for name, bucket in (
            ("requests", requests),
            ("input-tokens", inputs),
            ("output-tokens", outputs),
            ("tokens", tighter),
        ):
            headers[f"{HEADER_PREFIX}{name}-limit"] = str(bucket.capacity)
            headers[f"{HEADER_PREFIX}{name}-remaining"] = str(bucket.remaining())
            headers[f"{HEADER_PREFIX}{name}-reset"] = _rfc3339(now + bucket.seconds_to_full())
        return headers

    def headers(self, model: str | None) -> dict[str, str]:
        """The ``anthropic-ratelimit-*`` headers of ``model`` now (full buckets when ``None``)."""
        now = self._clock()
        with self._lock:
            if model is None:
                fresh = (
                    TokenBucket(self.limits.rpm, now),
                    TokenBucket(self.limits.itpm, now),
                    TokenBucket(self.limits.otpm, now),
                )
                return self._headers(fresh, now)
            return self._headers(self._get(model, now), now)

    def exhausted_headers(self, model: str | None, retry_after_s: float) -> dict[str, str]:
        """Headers of an injected 429 fault: requests exhausted until ``retry_after_s`` from now."""
        headers = self.headers(model)
        reset = _rfc3339(self._clock() + retry_after_s)
        for name in ("requests", "tokens"):
            headers[f"{HEADER_PREFIX}{name}-remaining"] = "0"
            headers[f"{HEADER_PREFIX}{name}-reset"] = reset
        return headers

    def admit(self, model: str, input_tokens: int, max_tokens: int) -> tuple[Admission, dict[str, str]]:
        """Charge one request, its input tokens and ``max_tokens``; raise :class:`RateLimited` when
        a bucket lacks room (charging nothing). Returns the admission and the headers after the charge.
        """
        now = self._clock()
        with self._lock:
            buckets = self._get(model, now)
            requests, inputs, outputs = buckets
            needs = (
                (requests, 1, "requests"),
                (inputs, input_tokens, "input tokens"),
                (outputs, max_tokens, "output tokens"),
            )
            short = [(bucket.wait_for(amount), bucket, unit) for bucket, amount, unit in needs]
            waits = [entry for entry in short if entry[0] > 0]
            if waits:
                wait, bucket, unit = max(waits, key=lambda e: e[0])
                retry_after = max(1, math.ceil(wait))
                headers = self._headers(buckets, now)
                headers["retry-after"] = str(retry_after)
                message = (
                    f"This request would exceed the rate limit for your organization of {bucket.capacity:,} "
                    f"{unit} per minute (model: {model}). For details, refer to: "
                    "https://platform.claude.com/docs/en/api/rate-limits. You can see the response headers "
                    "for current usage. Please reduce the prompt length or the maximum tokens requested, "
                    "or try again later."
                )
                raise RateLimited(message, retry_after, headers)
            requests.level -= 1
            inputs.level -= input_tokens
            outputs.level -= max_tokens
            return Admission(self, model, max_tokens), self._headers(buckets, now)

    def refund_output(self, model: str, tokens: int) -> None:
        """Give back output tokens charged at admission but not generated."""
        if tokens <= 0:
            return
        now = self._clock()
        with self._lock:
            _, _, outputs = self._get(model, now)
            outputs.level = min(outputs.capacity, outputs.level + tokens)

    def reset(self) -> None:
        """Forget every bucket (all full again)."""
        with self._lock:
            self._buckets.clear()
