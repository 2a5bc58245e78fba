"""Text deltas joined into fewer, larger pieces: the first at once, then at most one every interval.

Each piece costs something downstream (a Redis ``XADD``, a thread woken up), while a reader only
needs the first text fast and the rest a few times a second. Used for a job's token stream
(:class:`tierq.store.streams.TokenPublisher`) and for handing texts off the event loop
(:func:`tierq.llm.client.stream_reply_on_loop`).
"""

from __future__ import annotations

import time

__all__ = ["TextBatcher"]


class TextBatcher:
    """Holds deltas; :meth:`add` says when enough time has passed to let what it holds go."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._held: list[str] = []
        self._last: float | None = None

    def add(self, text: str) -> str | None:
        """Take a delta; the joined text to send now (the first one, or after ``interval_s``), or None."""
        self._held.append(text)
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval_s:
            return None
        self._last = now
        return self.drain()

    def drain(self) -> str | None:
        """Everything held, joined (None if nothing is), e.g. at the end of a reply."""
        if not self._held:
            return None
        text = "".join(self._held)
        self._held.clear()
        return text
