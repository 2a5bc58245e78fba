"""One rate limit per model for a whole deployment, in Redis: requests, input and output tokens.

The API limits an organisation per model: requests, input tokens and output tokens per minute,
each a token bucket that refills continuously, with a request's output charged at its
``max_tokens`` as it starts and adjusted after (https://platform.claude.com/docs/en/api/rate-limits).
Every worker of every tier shares these buckets (one hash per model, ``Keys.rate_limit``), so
that a burst is spread over the limit instead of meeting it as a storm of 429s:

- :meth:`SharedRateLimiter.reserve` takes a request's estimate from all three buckets at once, or
  nothing, and says how long until it would fit (one Lua script, Redis's own clock: every worker
  sees the same time). ``floor`` keeps a share of each bucket out of reach: a lower tier reserves
  with a floor, so the share the fast tier needs stays for it;
- :meth:`SharedRateLimiter.settle` returns what a finished request did not use;
- :meth:`SharedRateLimiter.correct` lowers the buckets to what the API's
  ``anthropic-ratelimit-*`` headers say remains (other deployments on the same key spend too)
  and learns the limits from them; :meth:`SharedRateLimiter.block` holds every request of the
  model until a 429's ``retry-after`` has passed.

Limits start from what the deployment configures per model and are replaced by the ones the API
reports. The buckets start full.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from worker.store.keys import Keys

__all__ = ["KINDS", "ModelLimits", "Reservation", "SharedRateLimiter"]

#: the three buckets of a model, in the order the scripts take them
KINDS = ("requests", "input_tokens", "output_tokens")
#: the API's header name of each bucket (``anthropic-ratelimit-<name>-limit|remaining|reset``)
_HEADER_NAMES = {"requests": "requests", "input_tokens": "input-tokens", "output_tokens": "output-tokens"}
#: seconds in which an empty bucket refills to its limit
WINDOW_S = 60.0

# KEYS[1]: the model's hash. ARGV: need per kind (3), floor fraction, limit per kind (3, the
# configured ones: the hash's learned ones win). Returns {granted 0|1, seconds to wait as a string}
# (-1: the need exceeds a limit, it never fits).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local kinds = {'requests', 'input_tokens', 'output_tokens'}
local at = tonumber(redis.call('HGET', KEYS[1], 'at')) or now
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0
local floor = tonumber(ARGV[4])
local level, limit = {}, {}
local wait, fits = 0, true
for i, kind in ipairs(kinds) do
  limit[i] = tonumber(redis.call('HGET', KEYS[1], 'limit:' .. kind)) or tonumber(ARGV[4 + i])
  local stored = tonumber(redis.call('HGET', KEYS[1], kind)) or limit[i]
  level[i] = math.min(limit[i], stored + math.max(0, now - at) * limit[i] / 60)
  local need = tonumber(ARGV[i])
  if need > limit[i] * (1 - floor) then
    return {0, '-1'}
  end
  local room = level[i] - floor * limit[i]
  if need > room then
    fits = false
    wait = math.max(wait, (need - room) * 60 / limit[i])
  end
end
if blocked > now then
  fits = false
  wait = math.max(wait, blocked - now)
end
for i, kind in ipairs(kinds) do
  if fits then level[i] = level[i] - tonumber(ARGV[i]) end
  redis.call('HSET', KEYS[1], kind, tostring(level[i]))
end
redis.call('HSET', KEYS[1], 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
if fits then return {1, '0'} end
return {0, tostring(wait)}
"""

# KEYS[1]: the model's hash. ARGV: amount per kind (3) to give back. Levels never pass the limits.
_REFUND = """
local kinds = {'requests', 'input_tokens', 'output_tokens'}
for i, kind in ipairs(kinds) do
  local amount = tonumber(ARGV[i])
  local level = tonumber(redis.call('HGET', KEYS[1], kind))
  local limit = tonumber(redis.call('HGET', KEYS[1], 'limit:' .. kind)) or tonumber(ARGV[3 + i])
  if amount > 0 and level then
    redis.call('HSET', KEYS[1], kind, tostring(math.min(limit, level + amount)))
  end
end
return 1
"""

# KEYS[1]: the model's hash. ARGV: per kind (3) the API's remaining (or ''), then per kind its
# limit (or ''). Lowers each level to the API's remaining; learns the limits.
_CORRECT = """
local kinds = {'requests', 'input_tokens', 'output_tokens'}
for i, kind in ipairs(kinds) do
  local limit = tonumber(ARGV[3 + i])
  if limit and limit > 0 then redis.call('HSET', KEYS[1], 'limit:' .. kind, tostring(limit)) end
  local remaining = tonumber(ARGV[i])
  if remaining then
    local level = tonumber(redis.call('HGET', KEYS[1], kind))
    if level == nil or remaining < level then
      redis.call('HSET', KEYS[1], kind, tostring(remaining))
    end
  end
end
if redis.call('HEXISTS', KEYS[1], 'at') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'at', tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000))
end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""

# KEYS[1]: the model's hash. ARGV[1]: seconds. Holds the model until then (never shortens a hold).
_BLOCK = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0
if until_ > current then redis.call('HSET', KEYS[1], 'blocked_until', tostring(until_)) end
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """A model's limits per minute, as configured (the API's headers replace them once seen)."""

    requests: int
    input_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        for kind in KINDS:
            if getattr(self, kind) < 1:
                raise ValueError(f"{kind} per minute must be at least 1")

    @classmethod
    def parse(cls, spec: str) -> ModelLimits:
        """``requests=N,input_tokens=N,output_tokens=N`` (each per minute, all three)."""
        values: dict[str, int] = {}
        for part in spec.split(","):
            name, sep, raw = part.strip().partition("=")
            if not sep or name.strip() not in KINDS or not raw.strip().isdigit():
                raise ValueError(f"expected requests=N,input_tokens=N,output_tokens=N, got {spec!r}")
            values[name.strip()] = int(raw)
        if set(values) != set(KINDS):
            raise ValueError(f"expected all of {', '.join(KINDS)}, got {spec!r}")
        return cls(**values)

    def as_args(self) -> list[int]:
        return [self.requests, self.input_tokens, self.output_tokens]


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`SharedRateLimiter.reserve` took, or how long until it would fit."""

    model: str
    input_tokens: int
    output_tokens: int
    granted: bool
    #: seconds until the request would fit (0 when granted; ``inf`` when it never fits the limit)
    wait_s: float


class SharedRateLimiter:
    """The rate-limit buckets of every model, shared by every process on one Redis."""

    def __init__(self, client: redis.Redis, limits: ModelLimits, key_prefix: str = "") -> None:
        """``limits``: what a model may use until the API's headers say otherwise."""
        self.client = client
        self.limits = limits
        self.keys = Keys(key_prefix)
        self._reserve = client.register_script(_RESERVE)
        self._refund = client.register_script(_REFUND)
        self._correct = client.register_script(_CORRECT)
        self._block = client.register_script(_BLOCK)

    def reserve(self, model: str, input_tokens: int, output_tokens: int, floor: float = 0.0) -> Reservation:
        """Take one request, ``input_tokens`` and ``output_tokens`` (its ``max_tokens``) from the
        model's buckets, all or nothing, leaving ``floor`` (a fraction, 0 to 1) of each untouched."""
        keys, args = self._reserve_call(model, input_tokens, output_tokens, floor)
        return self.reservation(model, input_tokens, output_tokens, self._reserve(keys=keys, args=args))

    def queue_reserve(
        self,
        pipe: redis.client.Pipeline,
        model: str,
        input_tokens: int,
        output_tokens: int,
        floor: float = 0.0,
    ) -> None:
        """:meth:`reserve` as one more command of ``pipe`` (its reply: :meth:`reservation`), so that
        it rides on a round trip the caller makes anyway. Sent as EVAL: a script object in a
        pipeline costs redis-py a SCRIPT EXISTS round trip of its own."""
        keys, args = self._reserve_call(model, input_tokens, output_tokens, floor)
        pipe.eval(_RESERVE, len(keys), *keys, *args)

    def reservation(self, model: str, input_tokens: int, output_tokens: int, reply: object) -> Reservation:
        """The :class:`Reservation` a reserve script's reply grants (or refuses)."""
        if not isinstance(reply, list | tuple) or len(reply) != 2:
            raise ValueError(f"not a reserve reply: {reply!r}")
        granted, wait = reply
        wait_s = float(wait)
        return Reservation(
            model=model,
            input_tokens=max(0, input_tokens),
            output_tokens=max(0, output_tokens),
            granted=bool(int(granted)),
            wait_s=math.inf if wait_s < 0 else wait_s,
        )

    def _reserve_call(
        self, model: str, input_tokens: int, output_tokens: int, floor: float
    ) -> tuple[list[str], list[float]]:
        if not 0.0 <= floor < 1.0:
            raise ValueError("floor must be in [0, 1)")
        needs = [1, max(0, input_tokens), max(0, output_tokens)]
        return [self.keys.rate_limit(model)], [*needs, floor, *self.limits.as_args()]

    def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int) -> None:
        """Give back what a granted request reserved and did not use (its real usage is known)."""
        if not reservation.granted:
            return
        back = [0, reservation.input_tokens - input_tokens, reservation.output_tokens - output_tokens]
        if back[1] > 0 or back[2] > 0:
            self._refund(keys=[self.keys.rate_limit(reservation.model)], args=[*back, *self.limits.as_args()])

    def release(self, reservation: Reservation) -> None:
        """Give back all of a granted reservation whose request was never sent."""
        if reservation.granted:
            back = [1, reservation.input_tokens, reservation.output_tokens]
            self._refund(keys=[self.keys.rate_limit(reservation.model)], args=[*back, *self.limits.as_args()])

    def correct(self, model: str, headers: Mapping[str, str]) -> None:
        """Lower the buckets to what a response's ``anthropic-ratelimit-*-remaining`` headers say is
        left, and learn the model's limits from its ``-limit`` headers."""
        lowered = {name.lower(): value for name, value in headers.items()}
        remaining, limits = [], []
        for kind in KINDS:
            base = f"anthropic-ratelimit-{_HEADER_NAMES[kind]}"
            remaining.append(_number(lowered.get(f"{base}-remaining")))
            limits.append(_number(lowered.get(f"{base}-limit")))
        if any(v != "" for v in (*remaining, *limits)):
            self._correct(keys=[self.keys.rate_limit(model)], args=[*remaining, *limits])

    def block(self, model: str, retry_after_s: float) -> None:
        """Hold every request of the model for ``retry_after_s`` (a 429's ``retry-after``)."""
        if retry_after_s > 0:
            self._block(keys=[self.keys.rate_limit(model)], args=[retry_after_s])


def _number(value: str | None) -> str:
    """A header's non-negative integer as the scripts take it, or '' when absent or not a number."""
    if value is None:
        return ""
    text = value.strip()
    return text if text.isdigit() else ""
