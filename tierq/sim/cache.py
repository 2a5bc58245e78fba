"""Prompt caching as the API does it (https://platform.claude.com/docs/en/build-with-claude/prompt-caching).

- A breakpoint is a block with ``cache_control``, or the last block of a request with a top-level
  ``cache_control`` (automatic caching).
- The cached prefix is every block up to and including the breakpoint (tools, then system, then
  messages), keyed by model and content. On each request the API looks for the longest cached
  prefix ending at a breakpoint or at one of the 20 blocks before it (the lookback window) and
  reads it (``cache_read_input_tokens``); the prefixes at later breakpoints are written
  (``cache_creation_input_tokens``, split by TTL in ``cache_creation``).
- A prefix shorter than the model's minimum cacheable length is silently not cached.
- A read refreshes the entry's TTL (5 minutes or 1 hour, wall seconds on the injected clock).
- ``input_tokens`` is what is left: the tokens after the last cached or written breakpoint.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from tierq.sim.validation import TTL_SECONDS, Prompt

__all__ = ["LOOKBACK_BLOCKS", "CachePlan", "PromptCache"]

#: Blocks before a breakpoint the API also checks for a cache hit.
LOOKBACK_BLOCKS: Final = 20


@dataclass(frozen=True)
class CachePlan:
    """How one request uses the cache: what it reads, what it writes, what is left as input."""

    model: str
    read_tokens: int = 0
    #: Entry read (its TTL is refreshed on commit).
    read_key: str | None = None
    read_ttl: str | None = None
    #: Entries written: ``(key, ttl)``.
    writes: tuple[tuple[str, str], ...] = ()
    creation_5m: int = 0
    creation_1h: int = 0
    input_tokens: int = 0

    @property
    def creation_tokens(self) -> int:
        return self.creation_5m + self.creation_1h

    def usage(self) -> dict[str, object]:
        """The input side of ``usage``."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.creation_tokens,
            "cache_read_input_tokens": self.read_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.creation_5m,
                "ephemeral_1h_input_tokens": self.creation_1h,
            },
        }


def _prefix_keys(prompt: Prompt) -> list[str]:
    """Key of the prefix ending at each segment: a running hash over tools, then each block."""
    keys: list[str] = []
    running = hashlib.sha256(prompt.tools_key.encode())
    for segment in prompt.segments:
        running.update(b"\x00" + segment.canonical.encode())
        keys.append(running.copy().hexdigest())
    return keys


@dataclass
class PromptCache:
    """Cached prefixes by ``(model, prefix key)``: their TTL and expiry, behind one lock."""

    clock: Callable[[], float]
    _entries: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, prompt: Prompt, model: str, min_tokens: int) -> CachePlan:
        """Work out the reads and writes of ``prompt`` on ``model`` without changing the cache."""
        total = prompt.input_tokens
        points = prompt.breakpoints()
        if not points:
            return CachePlan(model=model, input_tokens=total)
        keys = _prefix_keys(prompt)
        cumulative: list[int] = []
        running = 0
        for segment in prompt.segments:
            running += segment.tokens
            cumulative.append(running)
        now = self.clock()
        read_at, read_key, read_ttl = -1, None, None
        with self._lock:
            for index, _ in points:
                for candidate in range(index, max(-1, index - LOOKBACK_BLOCKS - 1), -1):
                    if candidate <= read_at:
                        break
                    entry = self._entries.get((model, keys[candidate]))
                    if entry is not None and entry[1] > now:
                        read_at, read_key, read_ttl = candidate, keys[candidate], entry[0]
                        break
        read_tokens = cumulative[read_at] if read_at >= 0 else 0
        writes: list[tuple[str, str]] = []
        creation = {"5m": 0, "1h": 0}
        covered = read_tokens
        for index, ttl in points:
            if index <= read_at or cumulative[index] < min_tokens:
                continue
            writes.append((keys[index], ttl))
            creation[ttl] += cumulative[index] - covered
            covered = cumulative[index]
        return CachePlan(
            model=model,
            read_tokens=read_tokens,
            read_key=read_key,
            read_ttl=read_ttl,
            writes=tuple(writes),
            creation_5m=creation["5m"],
            creation_1h=creation["1h"],
            input_tokens=total - covered,
        )

    def commit(self, plan: CachePlan) -> None:
        """Write the plan's entries and refresh the one it read."""
        now = self.clock()
        with self._lock:
            if plan.read_key is not None and plan.read_ttl is not None:
                self._entries[(plan.model, plan.read_key)] = (plan.read_ttl, now + TTL_SECONDS[plan.read_ttl])
            for key, ttl in plan.writes:
                self._entries[(plan.model, key)] = (ttl, now + TTL_SECONDS[ttl])
            expired = [k for k, (_, expires) in self._entries.items() if expires <= now]
            for k in expired:
                del self._entries[k]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def reset(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
