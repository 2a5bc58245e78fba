"""The scenarios, by name, in the order ``all`` runs them."""

from __future__ import annotations

from collections.abc import Callable

from bench.harness import Harness
from bench.result import Options, ScenarioResult
from bench.scenarios import concurrency, cost, isolation, overhead, streaming

__all__ = ["SCENARIOS", "ScenarioFn"]

ScenarioFn = Callable[[Harness, Options], ScenarioResult]

#: name → (title, run)
SCENARIOS: dict[str, tuple[str, ScenarioFn]] = {
    "overhead": (overhead.TITLE, overhead.run),
    "isolation": (isolation.TITLE, isolation.run),
    "streaming": (streaming.TITLE, streaming.run),
    "concurrency": (concurrency.TITLE, concurrency.run),
    "cost": (cost.TITLE, cost.run),
}
