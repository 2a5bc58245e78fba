"""The simulator's mutable state: fault scripts, the fault probability table and request counts.

One :class:`SimState` lives on the app (``app.state.sim``) and is shared by the server's event
loop and by tests in other threads, so every method takes its lock.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

from simulator.faults import OK, Fault, draw_fault, validate_rates

__all__ = ["SimState"]


class SimState:
    """Fault scripts, fault probabilities and per-job request counts, behind one lock."""

    def __init__(self, fault_rates: Mapping[str, float] | None = None, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._job_scripts: dict[str, deque[Fault]] = {}
        self._global_script: deque[Fault] = deque()
        self._rates: dict[Fault, float] = validate_rates(fault_rates or {})
        self._total = 0
        self._by_job: Counter[str] = Counter()

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

    def reset(self) -> None:
        """Clear scripts, the probability table and counts."""
        with self._lock:
            self._job_scripts.clear()
            self._global_script.clear()
            self._rates = {}
            self._total = 0
            self._by_job.clear()
