"""Prompt caching where it pays: which prefix of a request gets a ``cache_control`` breakpoint.

A request's stable prefix is its system prompt (the same for every job of a tier) and then the
user turn's instructions (the same for a producer's jobs of one kind); the document after them is
never marked. The API caches a marked prefix for 5 minutes, billing its first write at 1.25x input
and each read at 0.1x or less (https://platform.claude.com/docs/en/build-with-claude/prompt-caching).
So a breakpoint pays only when the prefix is sent again within those minutes, and does nothing at
all below the model's minimum cacheable length (silently: the request goes through uncached).

:class:`CachePlanner` marks a prefix when both hold: its estimated tokens reach the model's minimum
(``min_cacheable_tokens`` in ``prices.toml``), and this process sent the same prefix to the same
model within :data:`REUSE_WINDOW_S`. The first job of a prefix goes uncached (a one-off
instruction never pays the write's premium); the second writes; the rest read. Memory is bounded
(:data:`MAX_PREFIXES`, least recently sent dropped first): a sender controls instructions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from tierq.core.tokens import estimate_tokens
from tierq.llm.client import LLMRequest
from tierq.llm.pricing import PRICES, PriceTable

__all__ = [
    "MAX_PREFIXES",
    "REUSE_WINDOW_S",
    "UNKNOWN_MINIMUM",
    "CachePlanner",
    "min_cacheable_tokens",
    "system_prompt_cache",
]

#: seconds within which a prefix sent again is marked: under the cache's 5-minute lifetime, so the
#: write it pays for is still there for the next job
REUSE_WINDOW_S = 240.0
#: prefixes remembered per process
MAX_PREFIXES = 4096
#: the minimum assumed for a model the price table does not know (the largest published)
UNKNOWN_MINIMUM = 4096


def min_cacheable_tokens(model: str, prices: PriceTable = PRICES) -> int:
    """The shortest prefix ``model`` caches, in tokens."""
    price = prices.get(model)
    return UNKNOWN_MINIMUM if price is None else price.min_cacheable_tokens


def system_prompt_cache(model: str, system_prompt: str, prices: PriceTable = PRICES) -> tuple[bool, str]:
    """Whether a tier's system prompt reaches ``model``'s minimum cacheable length, and why, for an
    operator (``tierq doctor``). The estimate is the one :class:`CachePlanner` decides by."""
    minimum = min_cacheable_tokens(model, prices)
    tokens = estimate_tokens(len(system_prompt))
    if tokens >= minimum:
        return True, f"system prompt ~{tokens} tokens, over the {minimum} {model} caches: cached"
    return False, (
        f"system prompt ~{tokens} tokens, below the {minimum} {model} caches: the API silently "
        f"caches nothing; instructions of ~{minimum - tokens}+ tokens are cached with it"
    )


class CachePlanner:
    """Sets a request's cache breakpoints (thread-safe; one per worker process)."""

    def __init__(
        self,
        prices: PriceTable = PRICES,
        window_s: float = REUSE_WINDOW_S,
        max_prefixes: int = MAX_PREFIXES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prices = prices
        self.window_s = window_s
        self.max_prefixes = max_prefixes
        self.clock = clock
        self._sent: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def mark(self, request: LLMRequest) -> LLMRequest:
        """``request`` with a breakpoint after each stable prefix that pays to cache."""
        minimum = min_cacheable_tokens(request.model, self.prices)
        system_chars = len(request.system)
        key = hashlib.sha256(f"{request.model}\x00{request.system}".encode())
        cache_system = estimate_tokens(system_chars) >= minimum and self._again(key.digest())
        cache_instructions = False
        if request.instructions:
            key.update(b"\x00" + request.instructions.encode())
            prefix_chars = system_chars + len(request.instructions)
            cache_instructions = estimate_tokens(prefix_chars) >= minimum and self._again(key.digest())
        if not (cache_system or cache_instructions):
            return request
        return dataclasses.replace(request, cache_system=cache_system, cache_instructions=cache_instructions)

    def _again(self, key: bytes) -> bool:
        """Whether ``key`` was sent within the window; records this send."""
        now = self.clock()
        with self._lock:
            last = self._sent.pop(key, None)
            self._sent[key] = now
            while len(self._sent) > self.max_prefixes:
                self._sent.popitem(last=False)
        return last is not None and now - last <= self.window_s
