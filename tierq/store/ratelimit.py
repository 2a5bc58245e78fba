"""One rate limit per model for a whole deployment, in Redis: requests, input and output tokens.

The API limits an organisation per model: requests, input tokens and output tokens per minute,
each a token bucket that refills continuously, with a request's output charged at its
``max_tokens`` as it starts and adjusted after (https://platform.claude.com/docs/en/api/rate-limits).
Every worker of every tier shares these buckets (one hash per model, ``Keys.rate_limit``), so
that a burst is spread over the limit instead of meeting it as a storm of 429s:

- :meth:`SharedRateLimiter.reserve` takes a request's estimate from all three buckets at once, or
  nothing, and says how long until it would fit (one Lua script, Redis's own clock: every worker
  sees the same time). ``floor`` keeps a share of each bucket out of reach: a lower tier reserves
  with a floor, so the share the fast tier needs stays for it. A refused request gets an
  appointment, not just the time until the buckets hold it: the refused of one floor are spaced
  by what each needs, so a backlog of N jobs comes back one by one as the buckets refill, instead
  of N times at every refill. With a :class:`FairShare`, each producer of a tier has appointments
  of its own, spaced by its weight's share of the active producers, and a producer that holds
  more than that share of the tier's recent grants is held back while another producer waits;
- :meth:`SharedRateLimiter.finish` (after a call, one round trip) lowers the buckets to the
  response's headers, returns what the call did not use, holds the model after a 429 and counts
  the call for :class:`LimiterStats`;
- :meth:`SharedRateLimiter.correct` lowers the buckets to what the API's
  ``anthropic-ratelimit-*`` headers say remains (other deployments on the same key spend too)
  and learns the limits from them; :meth:`SharedRateLimiter.block` holds every request of the
  model until a 429's ``retry-after`` has passed.

Limits start from what the deployment configures per model and are replaced by the ones the API
reports. The buckets start full.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from tierq.contract.errors import ConfigError
from tierq.core.settings import Settings
from tierq.store.keys import Keys

__all__ = [
    "KINDS",
    "FairShare",
    "LimiterStats",
    "ModelLimits",
    "ModelState",
    "Reservation",
    "SharedRateLimiter",
    "TierFlow",
    "parse_weights",
]

#: the three buckets of a model, in the order the scripts take them
KINDS = ("requests", "input_tokens", "output_tokens")
#: the API's header name of each bucket (``anthropic-ratelimit-<name>-limit|remaining|reset``)
_HEADER_NAMES = {"requests": "requests", "input_tokens": "input-tokens", "output_tokens": "output-tokens"}
#: seconds in which an empty bucket refills to its limit
WINDOW_S = 60.0
#: seconds the per-minute counts (``Keys.rate_limit_stats``) are kept
STATS_TTL_S = 3 * 3600


# What the reserve and peek scripts start from: Redis's clock, the kinds, when the model's buckets
# were last brought up to date, and until when a 429 holds it.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local kinds = {'requests', 'input_tokens', 'output_tokens'}
local at = tonumber(redis.call('HGET', KEYS[1], 'at')) or now
local blocked = tonumber(redis.call('HGET', KEYS[1], 'blocked_until')) or 0
"""

# KEYS[1]: the model's hash; KEYS[2] (optional): the tier's fair-share hash for the model. ARGV:
# need per kind (3), floor fraction, limit per kind (3, the configured ones: the hash's learned ones
# win); with KEYS[2]: the producer, its weight, then the usage half-life, the seconds a producer
# counts as active (since its last reserve) and as waiting (since its last refusal), the wait a
# producer over its share is given, and how many producers are kept apart. Returns {granted 0|1,
# seconds to wait as a string} (-1: the need exceeds a limit, it never fits).
_RESERVE = (
    _PRELUDE
    + """
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
local held_back, spread, horizon_key = false, 1, 'horizon:' .. ARGV[4]
if KEYS[2] then
  -- weighted fair share between the tier's producers: each producer's grants decay with a
  -- half-life; one that holds more than its weight's share of the active producers' usage is
  -- held back while another producer waits (was refused lately)
  local me, weight = ARGV[8], tonumber(ARGV[9])
  if redis.call('HEXISTS', KEYS[2], me) == 0 and redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[14]) then
    me = '-'  -- past the producers a tier keeps apart (a sender names its own): share the anonymous one
  end
  local half_life, active_s = tonumber(ARGV[10]), tonumber(ARGV[11])
  local waiting_s, fair_wait = tonumber(ARGV[12]), tonumber(ARGV[13])
  local used, denied = 0, 0
  local total_w, total_u, others_wait, waiting_w = weight, 0, false, weight
  local raw = redis.call('HGETALL', KEYS[2])
  for i = 1, #raw, 2 do
    local u, t0, w, seen, refused = string.match(raw[i + 1], '^([^,]+),([^,]+),([^,]+),([^,]+),([^,]+)$')
    if u then
      local decayed = tonumber(u) * math.pow(0.5, math.max(0, now - tonumber(t0)) / half_life)
      if raw[i] == me then
        used, denied = decayed, tonumber(refused)
        total_u = total_u + decayed
      elseif tonumber(seen) >= now - active_s then
        total_w = total_w + tonumber(w)
        total_u = total_u + decayed
        -- waiting: refused lately, or holding appointments still to come round
        local ahead = tonumber(redis.call('HGET', KEYS[1], horizon_key .. ':' .. raw[i])) or 0
        if tonumber(refused) >= now - waiting_s or ahead > now then
          others_wait, waiting_w = true, waiting_w + tonumber(w)
        end
      elseif tonumber(seen) < now - 600 then
        redis.call('HDEL', KEYS[2], raw[i])
      end
    end
  end
  -- held back only where it matters: the grant would leave no room for a waiting one's request
  local scarce = false
  for i = 1, 3 do
    if level[i] - floor * limit[i] < 2 * tonumber(ARGV[i]) then scarce = true end
  end
  if fits and scarce and others_wait and total_u > 0 and used + 1 > total_u * weight / total_w + 1 then
    fits, held_back = false, true
    wait = math.max(wait, fair_wait)
  end
  if fits then used = used + 1 else denied = now end
  -- each producer's appointments are spaced by its share of the producers waiting now: waiting
  -- producers' jobs come back interleaved, and a producer alone is spaced by what it needs
  spread, horizon_key = waiting_w / weight, horizon_key .. ':' .. me
  redis.call('HSET', KEYS[2], me, string.format('%.4f,%.6f,%.3f,%.6f,%.6f', used, now, weight, now, denied))
  redis.call('EXPIRE', KEYS[2], 3600)
end
if not fits and not held_back then
  -- an appointment: the refused of one floor (and producer) are spaced by what each needs, so a
  -- backlog comes back one by one as the buckets refill instead of all at the first refill
  local spacing = 0
  for i = 1, 3 do spacing = math.max(spacing, tonumber(ARGV[i]) * 60 / limit[i]) end
  local horizon = tonumber(redis.call('HGET', KEYS[1], horizon_key)) or 0
  local appointment = now + wait
  if horizon > now then appointment = math.max(appointment, horizon + spacing * spread) end
  redis.call('HSET', KEYS[1], horizon_key, tostring(appointment))
  wait = appointment - now
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
)

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


# KEYS[1]: the model's hash. ARGV: limit per kind (3, the configured ones), an appointments field.
# Returns, without changing anything, per kind the level now (refilled) and the limit, then the
# seconds the model is held for and until that field's last appointment, all as strings.
_PEEK = (
    _PRELUDE
    + """
local out = {}
for i, kind in ipairs(kinds) do
  local limit = tonumber(redis.call('HGET', KEYS[1], 'limit:' .. kind)) or tonumber(ARGV[i])
  local stored = tonumber(redis.call('HGET', KEYS[1], kind)) or limit
  out[i] = tostring(math.min(limit, stored + math.max(0, now - at) * limit / 60))
  out[3 + i] = tostring(limit)
end
out[7] = tostring(math.max(0, blocked - now))
out[8] = tostring(math.max(0, (tonumber(redis.call('HGET', KEYS[1], ARGV[4])) or 0) - now))
return out
"""
)


#: the fair share's producer for jobs that name none
ANONYMOUS = "-"
#: seconds in which a producer's counted grants halve
FAIR_HALF_LIFE_S = 10.0
#: seconds a producer counts as active after its last reserve, and as waiting after its last refusal
FAIR_ACTIVE_S = 30.0
FAIR_WAITING_S = 3.0
#: seconds a producer over its share waits while another waits
FAIR_WAIT_S = 1.0
#: producers a tier keeps apart per model (each reserve reads them all); later ones share ANONYMOUS's
FAIR_MAX_PRODUCERS = 256
FAIR_SHARE_ARGS = (FAIR_HALF_LIFE_S, FAIR_ACTIVE_S, FAIR_WAITING_S, FAIR_WAIT_S, FAIR_MAX_PRODUCERS)


@dataclass(frozen=True, slots=True)
class FairShare:
    """Whose request a reserve is: the tier and the producer sharing it with the tier's others."""

    tier: str
    producer: str | None


def parse_weights(spec: str) -> dict[str, float]:
    """``name=weight,...`` (a weight above 0; names as a job's ``producer_id``); empty: none."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, raw = part.partition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = 0.0
        if not sep or not name.strip() or not 0 < weight <= 1000:
            raise ValueError(f"expected name=weight,... with weights in (0, 1000], got {spec!r}")
        weights[name.strip()] = weight
    return weights


@dataclass(frozen=True, slots=True)
class ModelState:
    """A model's buckets as they are now (:meth:`SharedRateLimiter.peek`)."""

    #: per kind (:data:`KINDS`): what is left, and the limit per minute
    levels: tuple[float, float, float]
    limits: tuple[float, float, float]
    #: seconds until a 429's hold ends (0: not held)
    held_s: float
    #: seconds until the last appointment given to the refused of one floor and producer
    appointments_s: float = 0.0

    def wait_s(self, needs: tuple[float, float, float], floor: float = 0.0) -> float:
        """Seconds until ``needs`` (per kind) would fit above ``floor``, as the buckets refill."""
        wait = max(self.held_s, self.appointments_s)
        for need, level, limit in zip(needs, self.levels, self.limits, strict=True):
            room = level - floor * limit
            if need > room:
                wait = max(wait, (need - room) * WINDOW_S / limit)
        return wait


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

    def __init__(
        self,
        client: redis.Redis,
        limits: ModelLimits,
        key_prefix: str = "",
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """``limits``: what a model may use until the API's headers say otherwise; ``weights``: each
        producer's weight in a tier's fair share (1 when not named)."""
        self.client = client
        self.limits = limits
        self.weights = dict(weights or {})
        self.keys = Keys(key_prefix)
        self._reserve = client.register_script(_RESERVE)
        self._refund = client.register_script(_REFUND)
        self._correct = client.register_script(_CORRECT)
        self._block = client.register_script(_BLOCK)
        self._peek = client.register_script(_PEEK)

    @classmethod
    def from_settings(cls, client: redis.Redis | None, settings: Settings) -> SharedRateLimiter | None:
        """The limiter of ``TIERQ_RATE_LIMIT`` and ``TIERQ_RATE_LIMITS`` on ``client`` (None: off)."""
        if client is None or not settings.rate_limit:
            return None
        try:
            limits = ModelLimits.parse(settings.rate_limits)
        except ValueError as exc:
            raise ConfigError(f"TIERQ_RATE_LIMITS: {exc}") from None
        try:
            weights = parse_weights(settings.producer_weights)
        except ValueError as exc:
            raise ConfigError(f"TIERQ_PRODUCER_WEIGHTS: {exc}") from None
        return cls(client, limits, settings.key_prefix, weights)

    def reserve(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        floor: float = 0.0,
        share: FairShare | None = None,
    ) -> Reservation:
        """Take one request, ``input_tokens`` and ``output_tokens`` (its ``max_tokens``) from the
        model's buckets, all or nothing, leaving ``floor`` (a fraction, 0 to 1) of each untouched;
        ``share``: whose request it is, for the fair share between a tier's producers."""
        keys, args = self._reserve_call(model, input_tokens, output_tokens, floor, share)
        return self.reservation(model, input_tokens, output_tokens, self._reserve(keys=keys, args=args))

    def queue_reserve(
        self,
        pipe: redis.client.Pipeline,
        model: str,
        input_tokens: int,
        output_tokens: int,
        floor: float = 0.0,
        share: FairShare | None = None,
    ) -> None:
        """:meth:`reserve` as one more command of ``pipe`` (its reply: :meth:`reservation`), so that
        it rides on a round trip the caller makes anyway. Sent as EVAL: a script object in a
        pipeline costs redis-py a SCRIPT EXISTS round trip of its own."""
        keys, args = self._reserve_call(model, input_tokens, output_tokens, floor, share)
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
        self, model: str, input_tokens: int, output_tokens: int, floor: float, share: FairShare | None
    ) -> tuple[list[str], list[float | str]]:
        if not 0.0 <= floor < 1.0:
            raise ValueError("floor must be in [0, 1)")
        needs: list[float | str] = [1, max(0, input_tokens), max(0, output_tokens)]
        keys, args = [self.keys.rate_limit(model)], [*needs, floor, *self.limits.as_args()]
        if share is not None:
            producer = share.producer or ANONYMOUS
            keys.append(self.keys.fair_share(share.tier, model))
            args += [producer, self.weights.get(producer, 1.0), *FAIR_SHARE_ARGS]
        return keys, args

    def fair_usage(self, tier: str, model: str) -> dict[str, float]:
        """Each producer's recent grants on ``tier`` for ``model`` (decayed as the script decays them)."""
        now = time.time()
        usage: dict[str, float] = {}
        stored: dict[bytes, bytes] = self.client.hgetall(self.keys.fair_share(tier, model))  # type: ignore[assignment]
        for name, value in stored.items():
            used, at, *_ = value.decode().split(",")
            usage[name.decode()] = float(used) * 0.5 ** (max(0.0, now - float(at)) / FAIR_HALF_LIFE_S)
        return usage

    def release(self, reservation: Reservation) -> None:
        """Give back all of a granted reservation whose request was never sent."""
        if reservation.granted:
            back = [1, reservation.input_tokens, reservation.output_tokens]
            self._refund(keys=[self.keys.rate_limit(reservation.model)], args=[*back, *self.limits.as_args()])

    def correct(self, model: str, headers: Mapping[str, str]) -> None:
        """Lower the buckets to what a response's ``anthropic-ratelimit-*-remaining`` headers say is
        left, and learn the model's limits from its ``-limit`` headers."""
        correction = _correction(headers)
        if correction is not None:
            self._correct(keys=[self.keys.rate_limit(model)], args=correction)

    def peek(self, model: str, floor: float = 0.0, share: FairShare | None = None) -> ModelState:
        """The model's buckets now, refilled, without taking anything, and how far ahead the
        appointments of ``floor`` (and ``share``'s producer) run."""
        field = f"horizon:{float(floor)!r}"  # as the reserve script names it (redis-py sends repr())
        if share is not None:
            field += f":{share.producer or ANONYMOUS}"
        reply = self._peek(keys=[self.keys.rate_limit(model)], args=[*self.limits.as_args(), field])
        values = [float(v) for v in reply]
        return ModelState(
            levels=(values[0], values[1], values[2]),
            limits=(values[3], values[4], values[5]),
            held_s=values[6],
            appointments_s=values[7],
        )

    def finish(
        self,
        reservation: Reservation,
        tier: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        headers: Mapping[str, str] | None = None,
        rate_limited_s: float | None = None,
        queue_wait_ms: float | None = None,
    ) -> None:
        """After a call, in one round trip: lower the buckets to the response's headers (sent as it
        started, with ``max_tokens`` charged), give back what the call did not use (``input_tokens``
        and ``output_tokens``: its usage; zero when it failed), hold the model for a 429's
        ``rate_limited_s``, and count the call for :class:`LimiterStats` (with its job's
        ``queue_wait_ms`` on a first attempt)."""
        key = self.keys.rate_limit(reservation.model)
        pipe = self.client.pipeline(transaction=False)
        correction = _correction(headers or {})
        if correction is not None:
            pipe.eval(_CORRECT, 1, key, *correction)
        back = [0, reservation.input_tokens - input_tokens, reservation.output_tokens - output_tokens]
        if reservation.granted and (back[1] > 0 or back[2] > 0):
            pipe.eval(_REFUND, 1, key, *back, *self.limits.as_args())
        if rate_limited_s is not None and rate_limited_s > 0:
            pipe.eval(_BLOCK, 1, key, rate_limited_s)
        counts = {f"calls:{tier}": 1, f"reserved_input:{reservation.model}": reservation.input_tokens}
        counts[f"reserved_output:{reservation.model}"] = reservation.output_tokens
        counts[f"used_input:{reservation.model}"] = input_tokens
        counts[f"used_output:{reservation.model}"] = output_tokens
        if rate_limited_s is not None:
            counts[f"429:{tier}"] = 1
        if queue_wait_ms is not None:
            counts[f"queue_waits:{tier}"] = 1
            counts[f"queue_wait_ms:{tier}"] = max(0, round(queue_wait_ms))
        _count(pipe, self.keys, counts)
        pipe.execute()

    def count(self, tier: str, what: str) -> None:
        """Count one ``what`` (``requeued``: sent back to wait; ``refused``: not admitted) of ``tier``."""
        pipe = self.client.pipeline(transaction=False)
        _count(pipe, self.keys, {f"{what}:{tier}": 1})
        pipe.execute()

    def block(self, model: str, retry_after_s: float) -> None:
        """Hold every request of the model for ``retry_after_s`` (a 429's ``retry-after``)."""
        if retry_after_s > 0:
            self._block(keys=[self.keys.rate_limit(model)], args=[retry_after_s])


def _correction(headers: Mapping[str, str]) -> list[str] | None:
    """The correct script's arguments from a response's headers; None when they say nothing."""
    lowered = {name.lower(): value for name, value in headers.items()}
    remaining, limits = [], []
    for kind in KINDS:
        base = f"anthropic-ratelimit-{_HEADER_NAMES[kind]}"
        remaining.append(_number(lowered.get(f"{base}-remaining")))
        limits.append(_number(lowered.get(f"{base}-limit")))
    args = [*remaining, *limits]
    return args if any(v != "" for v in args) else None


def _count(pipe: redis.client.Pipeline, keys: Keys, counts: Mapping[str, int]) -> None:
    """Add ``counts`` to this minute's hash of :class:`LimiterStats`."""
    key = keys.rate_limit_stats(int(time.time() // 60))
    for field, amount in counts.items():
        if amount:
            pipe.hincrby(key, field, amount)
    pipe.expire(key, STATS_TTL_S)


class LimiterStats:
    """What the shared rate limit saw, per minute, summed over recent minutes: per tier its calls,
    429s from the API, jobs sent back to wait for capacity and submits refused; per model the tokens
    reserved and used."""

    def __init__(self, client: redis.Redis, key_prefix: str = "") -> None:
        self.client = client
        self.keys = Keys(key_prefix)

    def read(self, minutes: int = 15, now: float | None = None) -> dict[str, int]:
        """Every count of the last ``minutes`` minutes (this one included), summed."""
        current = int((time.time() if now is None else now) // 60)
        pipe = self.client.pipeline(transaction=False)
        for minute in range(current - minutes + 1, current + 1):
            pipe.hgetall(self.keys.rate_limit_stats(minute))
        totals: dict[str, int] = {}
        for row in pipe.execute():
            for field, value in row.items():
                name = field.decode()
                totals[name] = totals.get(name, 0) + int(value)
        return totals

    def flow(self, tier: str, now: float | None = None) -> TierFlow:
        """The tier's calls per second and its jobs' mean queue wait, over this minute and the last."""
        now = time.time() if now is None else now
        current = int(now // 60)
        pipe = self.client.pipeline(transaction=False)
        for minute in (current - 1, current):
            pipe.hmget(
                self.keys.rate_limit_stats(minute),
                f"calls:{tier}",
                f"queue_waits:{tier}",
                f"queue_wait_ms:{tier}",
            )
        calls = waits = waited_ms = 0
        for row in pipe.execute():
            calls += int(row[0] or 0)
            waits += int(row[1] or 0)
            waited_ms += int(row[2] or 0)
        return TierFlow(
            calls_per_s=calls / (60 + now % 60) if calls else None,
            queue_wait_s=waited_ms / waits / 1000 if waits else None,
        )


@dataclass(frozen=True, slots=True)
class TierFlow:
    """How a tier's jobs flowed lately (:meth:`LimiterStats.flow`); None: nothing to tell from."""

    calls_per_s: float | None
    #: mean time a job waited in the queue before its first attempt
    queue_wait_s: float | None


def _number(value: str | None) -> str:
    """A header's non-negative integer as the scripts take it, or '' when absent or not a number."""
    if value is None:
        return ""
    text = value.strip()
    return text if text.isdigit() else ""
