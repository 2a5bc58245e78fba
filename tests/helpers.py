"""Helpers every test module may use: one way to wait on a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["FakeClock", "wait_until"]

T = TypeVar("T")


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


class FakeClock:
    """A wall clock (``time.time()`` seconds) that moves only when told: for rate-limit buckets and TTLs."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
