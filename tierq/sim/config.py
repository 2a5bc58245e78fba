"""The simulator's configuration: speed, faults, limits, the catalogue and the day it is served as of."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

from tierq.sim.catalogue import Catalogue
from tierq.sim.messages import PING_INTERVAL_S
from tierq.sim.ratelimit import DEFAULT_LIMITS, Limits
from tierq.sim.state import DEFAULT_MAX_TIMED_JOBS

__all__ = ["SimConfig"]


@dataclass
class SimConfig:
    """How the simulator behaves; every field has a working default."""

    #: Multiplies every simulated delay: 1.0 is real speed, 0.01 is 100x faster, 0 is no delay.
    time_scale: float = 1.0
    #: Seed for latency jitter, delta splitting and fault probabilities; ``None`` for a random one.
    seed: int | None = None
    #: Answer 401 to requests without an ``x-api-key`` or ``Authorization: Bearer`` header.
    require_api_key: bool = False
    #: ``retry-after`` of an injected ``429`` fault, in seconds.
    retry_after_s: float = 1.0
    #: How long a ``stall`` fault sends nothing, in seconds (not scaled by ``time_scale``).
    stall_s: float = 30.0
    #: Text deltas a ``midstream`` (or ``refusal``) fault sends before it strikes.
    midstream_deltas: int = 2
    #: Fault probabilities for chaos runs, e.g. ``{"529": 0.1, "429": 0.05}``.
    fault_rates: dict[str, float] = field(default_factory=dict)
    #: Replaces every model's latency jitter (0: each call of a model takes the same time).
    jitter: float | None = None
    #: Fixed time to first text delta, in seconds (not scaled), instead of the model's.
    fixed_ttft_s: float | None = None
    #: Fixed duration of a whole call, in seconds (not scaled): the deltas are spread over it.
    fixed_total_s: float | None = None
    #: Jobs whose request timings are kept (the oldest are dropped beyond).
    max_timed_jobs: int = DEFAULT_MAX_TIMED_JOBS
    #: Per-model rate limits (requests, input and output tokens per minute); generous by default.
    limits: Limits = DEFAULT_LIMITS
    #: Wall clock (seconds) of the rate-limit buckets and cache TTLs; tests inject a fake one.
    clock: Callable[[], float] | None = None
    #: The model catalogue; ``None`` reads the packaged ``tierq/sim/catalogue.toml``.
    catalogue: Catalogue | None = None
    #: The day the catalogue is served as of (models retired by then 404); ``None``: today, UTC.
    #: Tests pin it so that a retirement date passing does not change what they judge.
    today: date | None = None
    #: Longest silence in a stream before a ``ping`` (seconds, real time).
    ping_interval_s: float = PING_INTERVAL_S
