"""The simulator's mutable state: fault scripts, the fault probability table, request counts and timings,
the prompt cache, the rate-limit buckets and the Message Batches.

Timings are wall-clock (``time.time()``) marks of each ``/v1/messages`` request that carries a job id:
when it reached the app and when its first text delta was sent, for benchmarks that compare them
with the producer's and worker's clocks on the same machine.

One :class:`SimState` lives on the app (``app.state.sim``) and is shared by the server's event
loop and by tests in other threads, so every method takes its lock.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tierq.sim.batches import BatchStore
from tierq.sim.cache import PromptCache
from tierq.sim.faults import OK, Fault, draw_fault, validate_rates
from tierq.sim.ratelimit import DEFAULT_LIMITS, Limits, RateLimiter

__all__ = ["DEFAULT_MAX_TIMED_JOBS", "RequestTiming", "SimState"]

#: jobs whose request timings are kept; the oldest job's are dropped beyond this
DEFAULT_MAX_TIMED_JOBS = 100_000


@dataclass
class RequestTiming:
    """Wall-clock marks of one request (``time.time()`` seconds)."""

    #: when the request reached the app (its headers parsed, before the body is read)
    arrived_at: float
    #: when the first text delta was handed to the server; None if none was sent (yet)
    first_delta_at: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        """``{"arrived_at", "first_delta_at", "ttft_ms"}``; ``ttft_ms`` is arrival → first delta."""
        ttft = None
        if self.first_delta_at is not None:
            ttft = round((self.first_delta_at - self.arrived_at) * 1000, 3)
        return {**asdict(self), "ttft_ms": ttft}


class SimState:
    """Fault scripts, fault probabilities and per-job request counts, behind one lock.

    ``cache`` (the prompt cache) and ``limiter`` (the rate-limit buckets) read ``clock``
    (wall seconds, ``time.time`` unless a test injects its own); each has its own lock.
    """

    def __init__(
        self,
        fault_rates: Mapping[str, float] | None = None,
        seed: int | None = None,
        max_timed_jobs: int = DEFAULT_MAX_TIMED_JOBS,
        *,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.clock: Callable[[], float] = clock or time.time
        self.cache = PromptCache(self.clock)
        self.limiter = RateLimiter(limits, self.clock)
        #: the Message Batches created (:mod:`tierq.sim.batches`)
        self.batches = BatchStore(self.clock)
        self._lock = threading.Lock()
        self._timings: dict[str, list[RequestTiming]] = {}
        self._max_timed_jobs = max_timed_jobs
        self._rng = random.Random(seed)
        self._job_scripts: dict[str, deque[Fault]] = {}
        self._global_script: deque[Fault] = deque()
        self._rates: dict[Fault, float] = validate_rates(fault_rates or {})
        self._total = 0
        self._by_job: Counter[str] = Counter()
        #: per model: requests the rate limiter let through, and the ones it answered 429
        self._admitted: Counter[str] = Counter()
        self._rate_limited: Counter[str] = Counter()

    def add_faults(self, faults: Iterable[str | Fault], job_id: str | None = None) -> None:
        """Append faults to the FIFO script of ``job_id``, or to the global script when it is ``None``.

        Raises ``ValueError`` (appending nothing) when a spec is not a fault.
        """
        parsed = [f if isinstance(f, Fault) else Fault.parse(f) for f in faults]
        with self._lock:
            if job_id is None:
                self._global_script.extend(parsed)
            else:
                self._job_scripts.setdefault(job_id, deque()).extend(parsed)

    def set_rates(self, rates: Mapping[str, float]) -> None:
        """Replace the fault probability table, e.g. ``{"529": 0.1, "429": 0.05}``."""
        table = validate_rates(rates)
        with self._lock:
            self._rates = table

    def rates(self) -> dict[str, float]:
        """Return the fault probability table."""
        with self._lock:
            return {str(fault): p for fault, p in self._rates.items()}

    def scripts(self) -> dict[str, Any]:
        """Return the faults still scripted: ``{"global": [...], "by_job": {job_id: [...]}}``."""
        with self._lock:
            return {
                "global": [str(f) for f in self._global_script],
                "by_job": {
                    job: [str(f) for f in script] for job, script in self._job_scripts.items() if script
                },
            }

    def next_fault(self, job_id: str | None = None, header: str | None = None) -> Fault:
        """Choose the fault of one request: header, then job script, then global script, then rates.

        Consumes at most one scripted fault. Raises ``ValueError`` when ``header`` is not a fault.
        """
        if header:
            return Fault.parse(header)
        with self._lock:
            script = self._job_scripts.get(job_id) if job_id is not None else None
            if job_id is not None and script:
                fault = script.popleft()
                if not script:
                    del self._job_scripts[job_id]
                return fault
            if self._global_script:
                return self._global_script.popleft()
            if not self._rates:
                return OK
            return draw_fault(self._rates, self._rng)

    def record_request(self, job_id: str | None = None) -> None:
        """Count one ``/v1/messages`` request, under ``job_id`` too when it has one."""
        with self._lock:
            self._total += 1
            if job_id is not None:
                self._by_job[job_id] += 1

    def request_count(self, job_id: str | None = None) -> int:
        """Return the number of requests for ``job_id``, or in total when it is ``None``."""
        with self._lock:
            return self._total if job_id is None else self._by_job[job_id]

    def counts(self) -> dict[str, Any]:
        """Return ``{"total": N, "by_job": {job_id: count}}``."""
        with self._lock:
            return {"total": self._total, "by_job": dict(self._by_job)}

    def record_limit(self, model: str, admitted: bool) -> None:
        """Count one request of ``model`` the rate limiter admitted, or refused with a 429."""
        with self._lock:
            (self._admitted if admitted else self._rate_limited)[model] += 1

    def limit_counts(self) -> dict[str, Any]:
        """Per model that met the rate limiter: requests admitted, refused (429, not the injected
        faults) and the requests left in its bucket now:
        ``{"models": {model: {"admitted", "rate_limited", "requests_remaining"}}, "at": time}``."""
        with self._lock:
            models = sorted(set(self._admitted) | set(self._rate_limited))
            counts = {m: (self._admitted[m], self._rate_limited[m]) for m in models}
        at = self.clock()
        out: dict[str, Any] = {}
        for model, (admitted, limited) in counts.items():
            remaining = self.limiter.headers(model).get("anthropic-ratelimit-requests-remaining")
            out[model] = {
                "admitted": admitted,
                "rate_limited": limited,
                "requests_remaining": int(remaining) if remaining is not None else None,
            }
        return {"models": out, "at": at}

    def record_arrival(self, job_id: str, arrived_at: float) -> RequestTiming:
        """Keep the arrival time of a request of ``job_id``; return its record, to mark later."""
        timing = RequestTiming(arrived_at=arrived_at)
        with self._lock:
            if job_id not in self._timings and len(self._timings) >= self._max_timed_jobs:
                del self._timings[next(iter(self._timings))]
            self._timings.setdefault(job_id, []).append(timing)
        return timing

    def mark_first_delta(self, timing: RequestTiming, at: float) -> None:
        """Record when the first text delta of the request ``timing`` was sent."""
        with self._lock:
            if timing.first_delta_at is None:
                timing.first_delta_at = at

    def timings(self, job_id: str) -> list[dict[str, float | None]]:
        """The timings of every request of ``job_id`` (retries too), oldest first."""
        with self._lock:
            return [t.as_dict() for t in self._timings.get(job_id, [])]

    def all_timings(self) -> dict[str, list[dict[str, float | None]]]:
        """``{job_id: [timings of each request]}`` for every job still kept."""
        with self._lock:
            return {job: [t.as_dict() for t in ts] for job, ts in self._timings.items()}

    def reset(self) -> None:
        """Clear scripts, the probability table, counts, timings, the prompt cache, the buckets and
        the batches."""
        self.cache.reset()
        self.batches.reset()
        self.limiter.reset()
        with self._lock:
            self._timings.clear()
            self._job_scripts.clear()
            self._global_script.clear()
            self._rates = {}
            self._total = 0
            self._by_job.clear()
            self._admitted.clear()
            self._rate_limited.clear()
