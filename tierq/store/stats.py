"""Recent jobs in a bounded Redis stream, and their per-tier percentiles (``tierq stats``, the demo).

Each worker appends one entry per finished job (figures only, never text) with ``XADD ... MAXLEN ~``,
so the stream stays near ``TIERQ_STATS_MAXLEN`` entries however long the workers run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

import redis

from tierq.core.settings import Settings
from tierq.observe.logging import get_logger
from tierq.store.clients import backend_redis
from tierq.store.keys import Keys

__all__ = ["StatsStream", "percentile", "summarize"]

#: figures kept per entry
FIELDS = (
    "tier",
    "model",
    "outcome",
    "queue_wait_ms",
    "ttft_ms",
    "total_ms",
    "output_tokens_per_s",
    "cost_usd",
    "limiter_wait_ms",
    "prompt_tokens",
    "cache_read_tokens",
)

_log = get_logger("tierq.stats")


class StatsStream:
    """Append and read entries of the recent-jobs stream."""

    def __init__(self, client: redis.Redis, key_prefix: str = "", maxlen: int = 10_000) -> None:
        self.client = client
        self.key = Keys(key_prefix).stats
        self.maxlen = maxlen

    @classmethod
    def from_settings(cls, settings: Settings) -> StatsStream | None:
        """The stream in the result backend's Redis; None when the backend is not Redis."""
        client = backend_redis(settings)
        return None if client is None else cls(client, settings.key_prefix, settings.stats_maxlen)

    def record(
        self,
        *,
        tier: str,
        outcome: str,
        model: str | None = None,
        cost_usd: float | None = None,
        queue_wait_ms: float | None = None,
        ttft_ms: float | None = None,
        total_ms: float | None = None,
        output_tokens_per_s: float | None = None,
        limiter_wait_ms: float | None = None,
        prompt_tokens: int | None = None,
        cache_read_tokens: int | None = None,
    ) -> None:
        """Append one job's figures; a Redis error is logged, never raised (stats must not fail a job)."""
        entry = {
            "tier": tier,
            "model": model,
            "outcome": outcome,
            "queue_wait_ms": queue_wait_ms,
            "ttft_ms": ttft_ms,
            "total_ms": total_ms,
            "output_tokens_per_s": output_tokens_per_s,
            "cost_usd": cost_usd,
            "limiter_wait_ms": limiter_wait_ms,
            "prompt_tokens": prompt_tokens,
            "cache_read_tokens": cache_read_tokens,
        }
        fields = {k: str(v) for k, v in entry.items() if v is not None}
        try:
            self.client.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        except redis.RedisError as exc:
            _log.warning("stats.record_failed", error=str(exc))

    def recent(self, count: int = 1000) -> list[dict[str, str]]:
        """The newest ``count`` entries, newest first."""
        rows: list[tuple[bytes, dict[bytes, bytes]]] = self.client.xrevrange(self.key, count=count)  # type: ignore[assignment]
        return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in rows]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _floats(entries: Iterable[dict[str, str]], field: str) -> list[float]:
    out = []
    for entry in entries:
        try:
            out.append(float(entry[field]))
        except (KeyError, ValueError):
            continue
    return out


def summarize(entries: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per-tier counts, percentiles (p50/p95/p99) of the timings, median tokens/s, total cost and
    the prompt cache's hit ratio (cache-read tokens over prompt tokens)."""
    by_tier: dict[str, list[dict[str, str]]] = {}
    for entry in entries:
        by_tier.setdefault(entry.get("tier", "?"), []).append(entry)
    out: dict[str, dict[str, Any]] = {}
    for tier, rows in sorted(by_tier.items()):
        done = [r for r in rows if r.get("outcome") == "succeeded"]
        refused = sum(1 for r in rows if r.get("outcome") == "refused")
        summary: dict[str, Any] = {
            "jobs": len(rows),
            "succeeded": len(done),
            "refused": refused,
            "failed": len(rows) - len(done) - refused,
        }
        for field in ("queue_wait_ms", "ttft_ms", "total_ms"):
            values = _floats(done, field)
            for q in (50, 95, 99):
                summary[f"{field.removesuffix('_ms')}_p{q}_ms"] = percentile(values, q)
        waits = _floats(done, "limiter_wait_ms")
        for q in (50, 99):
            summary[f"limiter_wait_p{q}_ms"] = percentile(waits, q)
        rates = _floats(done, "output_tokens_per_s")
        summary["output_tokens_per_s_p50"] = statistics.median(rates) if rates else None
        summary["cost_usd"] = round(sum(_floats(rows, "cost_usd")), 6)
        # the share of prompt tokens read from the prompt cache
        prompt = sum(_floats(done, "prompt_tokens"))
        summary["cache_hit_ratio"] = (
            round(sum(_floats(done, "cache_read_tokens")) / prompt, 4) if prompt else None
        )
        out[tier] = summary
    return out
