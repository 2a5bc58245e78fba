"""Latency model: time to first token and output speed per model family.

A request draws one :class:`Timing` (TTFT and seconds per output token, each with
multiplicative jitter, both multiplied by ``time_scale``) and paces its output by it.
For benchmarks, the jitter can be overridden (0 makes every call of a model take the same time)
and a fixed TTFT and/or total duration can replace the profile altogether.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

__all__ = ["PROFILES", "LatencyModel", "LatencyProfile", "Timing", "profile_for"]


@dataclass(frozen=True)
class LatencyProfile:
    """Typical speed of one model family."""

    #: Time to first token, in seconds.
    ttft_s: float
    #: Output tokens per second once generation runs.
    tokens_per_s: float
    #: Relative jitter: each draw is multiplied by a uniform factor in ``[1 - jitter, 1 + jitter]``.
    jitter: float = 0.2


# Third-party published measurements (Artificial Analysis model pages, as summarized in the
# project's shared FINDINGS.md), good to about +-50%:
#   claude-haiku-4-5   TTFT ~0.5 s, ~100 output tok/s (53 first-party API .. 110)
#   claude-sonnet-4-x  TTFT ~1.8 s, ~60 output tok/s (55-63)
#   claude-opus-4-x    TTFT ~2.7 s, ~42 output tok/s (39-45)
# ASSUMED (no published measurement was found in the stored docs, 2026-11-30): the 5.x models and
# the Fable and Mythos lines. They think by default (tierq/sim/catalogue.toml), and their thinking
# tokens are paced like any output token, so the profiles below are only the per-token speed:
#   haiku 5.x   as Haiku 4.5 (same size class)
#   sonnet 5.x  as Sonnet 4.x
#   opus 5.x    as Opus 4.x
#   fable       between Sonnet and Opus (TTFT 2.2 s, 50 tok/s): assumed
#   mythos      the largest line: slower than Opus (TTFT 3.5 s, 30 tok/s): assumed
#: Profile per model family; the key is a substring of the model name, the first match wins.
PROFILES: dict[str, LatencyProfile] = {
    "haiku-5": LatencyProfile(ttft_s=0.5, tokens_per_s=100.0),
    "sonnet-5": LatencyProfile(ttft_s=1.8, tokens_per_s=60.0),
    "opus-5": LatencyProfile(ttft_s=2.7, tokens_per_s=42.0),
    "fable": LatencyProfile(ttft_s=2.2, tokens_per_s=50.0),
    "mythos": LatencyProfile(ttft_s=3.5, tokens_per_s=30.0),
    "haiku": LatencyProfile(ttft_s=0.5, tokens_per_s=100.0),
    "sonnet": LatencyProfile(ttft_s=1.8, tokens_per_s=60.0),
    "opus": LatencyProfile(ttft_s=2.7, tokens_per_s=42.0),
}

#: Profile for model names that name no known family.
DEFAULT_FAMILY = "sonnet"


def profile_for(model: str) -> LatencyProfile:
    """Return the latency profile of the family named in ``model`` (sonnet-like when unknown)."""
    name = model.lower()
    for family, profile in PROFILES.items():
        if family in name:
            return profile
    return PROFILES[DEFAULT_FAMILY]


@dataclass(frozen=True)
class Timing:
    """The delays drawn for one request, already jittered and scaled."""

    ttft_s: float
    s_per_token: float

    def offset(self, tokens_before: int) -> float:
        """Seconds from the request's start until output that follows ``tokens_before`` tokens."""
        return self.ttft_s + tokens_before * self.s_per_token

    def total(self, tokens: int) -> float:
        """Seconds a non-streaming response of ``tokens`` output tokens takes: TTFT plus generation."""
        return self.offset(tokens)


class LatencyModel:
    """Draws per-request timings from a seedable random source; thread-safe."""

    def __init__(
        self,
        time_scale: float = 1.0,
        seed: int | None = None,
        *,
        jitter: float | None = None,
        fixed_ttft_s: float | None = None,
        fixed_total_s: float | None = None,
    ) -> None:
        """``jitter`` replaces every profile's jitter; ``fixed_ttft_s`` and ``fixed_total_s`` (seconds,
        not scaled) replace the drawn TTFT and the whole call's duration."""
        if time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        if jitter is not None and not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        for name, value in (("fixed_ttft_s", fixed_ttft_s), ("fixed_total_s", fixed_total_s)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        self.time_scale = time_scale
        self.jitter = jitter
        self.fixed_ttft_s = fixed_ttft_s
        self.fixed_total_s = fixed_total_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _factor(self, jitter: float) -> float:
        with self._lock:
            return self._rng.uniform(1.0 - jitter, 1.0 + jitter)

    def timing_for(self, model: str, output_tokens: int = 1) -> Timing:
        """Draw the TTFT and per-token delay of one request to ``model``.

        ``output_tokens`` (the reply's length) matters only with ``fixed_total_s``: the time after
        the first token is spread evenly over them, so the call takes ``fixed_total_s`` in all.
        """
        profile = profile_for(model)
        jitter = profile.jitter if self.jitter is None else self.jitter
        ttft = profile.ttft_s * self._factor(jitter) * self.time_scale
        per_token = self._factor(jitter) / profile.tokens_per_s * self.time_scale
        if self.fixed_ttft_s is not None:
            ttft = self.fixed_ttft_s
        if self.fixed_total_s is not None:
            ttft = min(ttft, self.fixed_total_s)
            per_token = (self.fixed_total_s - ttft) / max(1, output_tokens)
        return Timing(ttft_s=ttft, s_per_token=per_token)
