"""One asyncio event loop per worker process, in a thread of its own, for the model calls.

Celery's threads pool gives each in-flight job a thread; with ``io = "asyncio"`` (every built-in
tier) that thread hands its call to this loop and sleeps until the call is done, so one thread
reads every open stream. At hundreds of calls in flight that costs about a third of the CPU per
call of each thread reading its own stream (``python -m bench.sdk_clients``): no GIL hand-off
per server-sent event, and the SDK's aiohttp transport parses HTTP in C.

The loop starts on first use (after a prefork pool has forked, never before) and runs until the
process exits; :func:`shutdown` closes what was registered with :func:`on_shutdown` first.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["on_shutdown", "run", "shutdown", "submit"]

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_lock = threading.Lock()
_closers: list[Callable[[], Awaitable[None]]] = []


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    if _loop is None:
        with _lock:
            if _loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                _thread = threading.Thread(target=serve, name="tierq-aioloop", daemon=True)
                _thread.start()
                ready.wait()
                _loop = loop
                atexit.register(shutdown)
    return _loop


def submit(coro: Coroutine[Any, Any, T]) -> Future[T]:
    """Schedule ``coro`` on the process's loop; its result or error arrives in the future."""
    return asyncio.run_coroutine_threadsafe(coro, _get_loop())


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the process's loop and wait for it (from any thread but the loop's own).

    After ``timeout`` seconds the coroutine is cancelled and :class:`TimeoutError` raised.
    """
    future = submit(coro)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


def on_shutdown(close: Callable[[], Awaitable[None]]) -> None:
    """Await ``close()`` on the loop when :func:`shutdown` runs (e.g. an SDK client's ``close``)."""
    with _lock:
        _closers.append(close)


def shutdown(timeout: float = 5.0) -> None:
    """Close what was registered, then stop the loop and its thread. Safe to call twice."""
    global _loop, _thread
    with _lock:
        loop, thread, closers = _loop, _thread, list(_closers)
        _loop, _thread = None, None
        _closers.clear()
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
