"""Helpers every test module may use: one way to wait on a condition, one way to start a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ROOT", "FakeClock", "run_tierq", "spawn", "wait_until"]

T = TypeVar("T")

#: the repository root: every process the tests start runs here, so ``python -m tests...`` resolves
ROOT = Path(__file__).resolve().parents[1]
#: the day the simulator serves its catalogue as of: a retirement date passing must not change a test
SIM_TODAY = date(2026, 12, 7)


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    check: Callable[[], None] | None = None,
    interval: float = 0.05,
) -> T:
    """Call ``probe`` until it returns something truthy, and return that; AssertionError naming
    ``what`` after ``timeout`` seconds. ``check`` runs between tries (to fail fast, e.g. on a dead worker)."""
    end = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _environment(env: Mapping[str, str] | None, inherit_env: bool) -> dict[str, str]:
    return {**(os.environ if inherit_env else {}), **(env or {})}


def spawn(
    module: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    inherit_env: bool = True,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start ``python -m MODULE ARGS`` from the repository root, for a process that runs beside the
    test (a worker, Flower, the demo, a driver); the caller stops it.

    ``env`` is added to this process's environment, or is the whole of it with ``inherit_env=False``;
    ``popen`` goes to :class:`subprocess.Popen` (stdout, stderr, stdin, text...)."""
    popen.setdefault("cwd", ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], env=_environment(env, inherit_env), **popen
    )


def run_tierq(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    *,
    stdin: str | None = None,
    inherit_env: bool = True,
    module: str = "tierq",
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tierq ARGS`` (the ``tierq`` CLI; or another ``module``) to its end, output
    captured as text. ``env`` as for :func:`spawn`; the console is 200 columns wide, so that rich
    tables and lines are not cut to the 80 of a pipe."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=_environment({"COLUMNS": "200", **(env or {})}, inherit_env),
    )


class FakeClock:
    """A wall clock (``time.time()`` seconds) that moves only when told: for rate-limit buckets and TTLs."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
