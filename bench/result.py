"""What a scenario returns: a table, targets (met / not met), notes, raw runs and samples for the plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Options", "ScenarioResult", "Target"]


@dataclass(frozen=True)
class Options:
    """Command-line choices every scenario honours."""

    #: runs to take the median over; None: the scenario's default
    runs: int | None = None
    #: a tiny version, seconds long, for the tests
    quick: bool = False

    def runs_or(self, default: int, quick: int = 1) -> int:
        """The number of runs: ``--runs``, else ``quick`` with ``--quick``, else ``default``."""
        if self.runs is not None:
            return max(1, self.runs)
        return quick if self.quick else default


@dataclass(frozen=True)
class Target:
    """A figure and the bound it should meet."""

    name: str
    value: float | None
    op: Literal["<=", ">="]
    limit: float
    unit: str = ""

    @property
    def met(self) -> bool | None:
        """True or False; None when the value could not be measured."""
        if self.value is None or math.isnan(self.value):
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _finite(self.value),
            "op": self.op,
            "limit": self.limit,
            "unit": self.unit,
            "met": self.met,
        }


@dataclass
class ScenarioResult:
    """One scenario's outcome; ``as_dict`` is what the JSON file holds."""

    scenario: str
    title: str
    #: the scenario's parameters (jobs, runs, simulator settings...)
    config: dict[str, Any] = field(default_factory=dict)
    #: the worker pools it ran, e.g. ``"tierq fast: threads -c32"``
    pools: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    #: headline figures (medians over runs), by name
    summary: dict[str, Any] = field(default_factory=dict)
    #: each run's figures
    runs: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: series for the plot (values of the last run, or per-run points)
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: why the scenario did not run, when it did not
    skipped: str | None = None
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = _clean(
            {
                "scenario": self.scenario,
                "title": self.title,
                "skipped": self.skipped,
                "elapsed_s": round(self.elapsed_s, 2),
                "config": self.config,
                "pools": self.pools,
                "summary": self.summary,
                "targets": [t.as_dict() for t in self.targets],
                "notes": self.notes,
                "table": {"columns": self.columns, "rows": self.rows},
                "runs": self.runs,
                "samples": self.samples,
            }
        )
        return cleaned


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else value


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, tuples lists."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
