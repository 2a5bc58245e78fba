"""A cancel signal for one running attempt: set from the run guard's heartbeat thread when the job's
producer cancelled it, seen by the model call wherever it waits."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["CancelToken"]


class CancelToken:
    """Set once; callbacks registered before or after run once it is set (in the setting thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled."""
        return self._set

    def cancel(self) -> None:
        """Cancel: run the callbacks once."""
        with self._lock:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the token is cancelled (at once if it already is)."""
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return
        callback()
