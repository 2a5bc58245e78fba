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
from tierq.store.scripts import lua

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
        self._reserve = client.register_script(lua("ratelimit_prelude", "ratelimit_reserve"))
        self._refund = client.register_script(lua("ratelimit_refund"))
        self._correct = client.register_script(lua("ratelimit_correct"))
        self._block = client.register_script(lua("ratelimit_block"))
        self._peek = client.register_script(lua("ratelimit_prelude", "ratelimit_peek"))

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
        pipe.eval(lua("ratelimit_prelude", "ratelimit_reserve"), len(keys), *keys, *args)

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
            pipe.eval(lua("ratelimit_correct"), 1, key, *correction)
        back = [0, reservation.input_tokens - input_tokens, reservation.output_tokens - output_tokens]
        if reservation.granted and (back[1] > 0 or back[2] > 0):
            pipe.eval(lua("ratelimit_refund"), 1, key, *back, *self.limits.as_args())
        if rate_limited_s is not None and rate_limited_s > 0:
            pipe.eval(lua("ratelimit_block"), 1, key, rate_limited_s)
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
