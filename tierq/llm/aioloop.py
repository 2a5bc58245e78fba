"""An asyncio event loop in a thread of its own, for the model calls of one worker process.

Celery's threads pool gives each in-flight job a thread; with ``io = "asyncio"`` (every built-in
tier) that thread hands its call to this loop and sleeps until the call is done, so one thread
reads every open stream. At hundreds of calls in flight that costs about a third of the CPU per
call of each thread reading its own stream (``python -m bench.sdk_clients``): no GIL hand-off
per server-sent event, and the SDK's aiohttp transport parses HTTP in C.

The loop starts on first use (after a prefork pool has forked, never before) and runs until
:meth:`EventLoopThread.shutdown`, which first awaits what was registered with ``on_shutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["EventLoopThread"]

T = TypeVar("T")


class EventLoopThread:
    """One event loop, run forever in a daemon thread once something is submitted to it."""

    def __init__(self, name: str = "tierq-aioloop") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            with self._lock:
                if self._loop is None:
                    loop = asyncio.new_event_loop()
                    ready = threading.Event()

                    def serve() -> None:
                        asyncio.set_event_loop(loop)
                        loop.call_soon(ready.set)
                        loop.run_forever()

                    thread = threading.Thread(target=serve, name=self._name, daemon=True)
                    thread.start()
                    ready.wait()
                    self._loop, self._thread = loop, thread
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the loop; its result or error arrives in the future."""
        return asyncio.run_coroutine_threadsafe(coro, self._get_loop())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it (from any thread but the loop's own).

        After ``timeout`` seconds the coroutine is cancelled and :class:`TimeoutError` raised.
        """
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def on_shutdown(self, close: Callable[[], Awaitable[None]]) -> None:
        """Await ``close()`` on the loop when :meth:`shutdown` runs (e.g. an SDK client's ``close``)."""
        with self._lock:
            self._closers.append(close)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Close what was registered, then stop the loop and its thread. Safe to call twice."""
        with self._lock:
            loop, thread, closers = self._loop, self._thread, list(self._closers)
            self._loop, self._thread = None, None
            self._closers.clear()
        if loop is None or thread is None:
            return

        async def close_all() -> None:
            for close in closers:
                with contextlib.suppress(Exception):  # closing at exit: nothing left to tell
                    await close()

        with contextlib.suppress(Exception):  # a loop that will not close still gets stopped
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
