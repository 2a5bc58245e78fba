"""Printing and saving results: the environment, a rich table per scenario, targets, JSON files."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.result import ScenarioResult, Target

__all__ = ["RESULTS_DIR", "console", "environment", "print_environment", "print_result", "write_json"]

#: where results go by default (git-ignored)
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_PACKAGES = {
    "celery": "celery",
    "kombu": "kombu",
    "redis-py": "redis",
    "hiredis": "hiredis",
    "anthropic": "anthropic",
    "httpx2": "httpx2",
    "uvicorn": "uvicorn",
}


def console() -> Console:
    """stdout, 120 columns wide off a terminal (rich would assume 80)."""
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def environment() -> dict[str, Any]:
    """Python and library versions, cores and load: what the figures depend on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "python": platform.python_version(),
        **{name: _version(dist) for name, dist in _PACKAGES.items()},
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_1m": round(load[0], 2),
    }


def print_environment(out: Console, env: dict[str, Any]) -> None:
    """One line of versions and cores."""
    out.print(
        f"[bold]environment[/]: python {env['python']} · celery {env['celery']} · kombu {env['kombu']} · "
        f"redis-py {env['redis-py']} (hiredis {env['hiredis']}) · anthropic {env['anthropic']} "
        f"(httpx2 {env['httpx2']}) · uvicorn {env['uvicorn']} · {env['cores']} cores · "
        f"load {env['loadavg_1m']}"
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def _met(target: Target) -> str:
    return {True: "[green]met[/]", False: "[red]not met[/]", None: "[yellow]n/a[/]"}[target.met]


def print_result(out: Console, result: ScenarioResult) -> None:
    """The scenario's table, its pools, targets and notes."""
    if result.skipped:
        out.print(f"[bold]{result.title}[/]: [yellow]skipped: {result.skipped}[/]")
        return
    table = Table(title=f"{result.title} ({result.elapsed_s:.0f} s)", title_justify="left")
    for i, column in enumerate(result.columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in result.rows:
        table.add_row(*(_cell(v) for v in row))
    out.print(table)
    if result.pools:
        out.print("pools: " + "; ".join(result.pools))
    for target in result.targets:
        value = _cell(target.value)
        bound = f"{target.op} {target.limit:g}{target.unit}"
        out.print(f"  target {target.name}: {value}{target.unit} {bound} → {_met(target)}")
    for note in result.notes:
        out.print(f"  · {note}")


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` as indented JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
