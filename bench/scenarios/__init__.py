"""The scenarios, by name, in the order ``all`` runs them (``http``, ``ratelimit`` and ``dollars`` run
only when named)."""

from __future__ import annotations

from collections.abc import Callable

from bench.harness import Harness
from bench.result import Options, ScenarioResult
from bench.scenarios import concurrency, cost, dollars, http_api, isolation, overhead, ratelimit, streaming

__all__ = ["SCENARIOS", "ScenarioFn"]

ScenarioFn = Callable[[Harness, Options], ScenarioResult]

#: name → (title, run)
SCENARIOS: dict[str, tuple[str, ScenarioFn]] = {
    "overhead": (overhead.TITLE, overhead.run),
    "isolation": (isolation.TITLE, isolation.run),
    "streaming": (streaming.TITLE, streaming.run),
    "concurrency": (concurrency.TITLE, concurrency.run),
    "cost": (cost.TITLE, cost.run),
    "http": (http_api.TITLE, http_api.run),
    "ratelimit": (ratelimit.TITLE, ratelimit.run),
    "dollars": (dollars.TITLE, dollars.run),
}
