"""``tierq stats``: per-tier latency, outcomes, rate limits and what waits in the broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from tierq.contract.message import STRAY_QUEUES

if TYPE_CHECKING:
    from tierq.contract.tiers import Tier
    from tierq.core.settings import Settings
from tierq.ops.commands._common import console, err, fail, ms, per_1000, print_json, share, warn

__all__ = ["RATE_LIMIT_MINUTES", "STRAY_WHY", "BrokerCounts", "broker_counts", "stats"]


def stats(
    last: Annotated[int, typer.Option(min=1, help="How many recent jobs to read.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per-tier percentiles of recent jobs, from the bounded stream the workers write."""
    from tierq.core.settings import get_settings, get_tier_table
    from tierq.store.batches import BatchStore
    from tierq.store.ratelimit import LimiterStats
    from tierq.store.stats import StatsStream, summarize

    settings, tier_table = get_settings(), get_tier_table().tiers
    stream = StatsStream.from_settings(settings)
    if stream is None:
        raise fail("stats need a Redis result backend (TIERQ_RESULT_BACKEND or TIERQ_BROKER_URL)")
    batch_tiers = [name for name, tier in tier_table.items() if tier.batch is not None]
    try:
        summary = summarize(stream.recent(last))
        counts = LimiterStats(stream.client, settings.key_prefix).read(RATE_LIMIT_MINUTES)
        batches = BatchStore(stream.client, settings.key_prefix)
        parked = {tier: batches.pending_count(tier) for tier in batch_tiers}
        in_flight = batches.in_flight_jobs() if batch_tiers else Counter()
    except Exception as exc:
        raise fail(f"cannot read stats: {exc}", code=1) from None
    broker = broker_counts(settings)
    deliveries = broker.deliveries
    limits = _rate_limit_rows(counts, tier_table)
    if as_json:
        for tier, row in summary.items():
            row.update(deliveries.get(tier, {}))
            row.update(limits.get(tier, {}))
        for tier, count in parked.items():
            summary.setdefault(tier, {}).update(batch_parked=count, batch_in_flight=in_flight[tier])
        print_json(summary)
        return
    table = Table(title=f"last {last} jobs per tier (ms)")
    columns = (
        "tier",
        "jobs",
        "failed",
        "refused",
        "queue p50",
        "queue p95",
        "TTFT p50",
        "TTFT p95",
        "total p50",
        "total p95",
    )
    for column in (*columns, "tok/s", "cache hit", "cost $"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier, row in summary.items():
        table.add_row(
            tier, str(row["jobs"]), str(row["failed"]), str(row["refused"]),
            *(ms(row[k]) for k in ("queue_wait_p50_ms", "queue_wait_p95_ms", "ttft_p50_ms", "ttft_p95_ms",
                                    "total_p50_ms", "total_p95_ms")),
            ms(row["output_tokens_per_s_p50"]), share(row["cache_hit_ratio"]), f"{row['cost_usd']:.4f}",
        )  # fmt: skip
    console().print(table)
    if any(row["calls"] or row["admissions_refused"] for row in limits.values()):
        rate = Table(title=f"shared rate limit per tier, last {RATE_LIMIT_MINUTES} minutes")
        rate_columns = (
            "tier",
            "model",
            "calls",
            "429/1000",
            "waits",
            "refused",
            "wait p50",
            "wait p99",
            "out used",
        )
        for column in rate_columns:
            rate.add_column(column, justify="left" if column in ("tier", "model") else "right")
        for tier, row in limits.items():
            jobs = summary.get(tier, {})
            used = row["output_used_share"]
            rate.add_row(
                tier, row["model"], str(row["calls"]), per_1000(row["api_429_per_1000"]),
                str(row["capacity_waits"]), str(row["admissions_refused"]),
                ms(jobs.get("limiter_wait_p50_ms")), ms(jobs.get("limiter_wait_p99_ms")),
                "-" if used is None else f"{used:.0%}",
            )  # fmt: skip
        console().print(rate)
        err.print(
            "waits: jobs that found no capacity within their tier's rate_limit_wait_s (sent back to the "
            "queue, or ended rate limited); refused: submits refused as unable to start before their "
            "deadline; out used: output tokens used / reserved (max_tokens) for the tier's model",
            highlight=False,
        )
    if deliveries:
        now = Table(title="deliveries per tier, now")
        for column in ("tier", "queued", "unacked", "recovered"):
            now.add_column(column, justify="left" if column == "tier" else "right")
        for tier, counts in deliveries.items():
            now.add_row(tier, *(str(counts[k]) for k in ("queued", "unacked", "recovered")))
        console().print(now)
        err.print(
            "unacked: taken by a worker, not acknowledged yet (running, or its worker died less than "
            "TIERQ_LEASE_S ago); recovered: put back after their worker died, since the broker started",
            highlight=False,
        )
    if any(parked.values()) or any(in_flight.values()):
        waiting = ", ".join(f"{tier} {parked[tier]} parked, {in_flight[tier]} in batches" for tier in parked)
        console().print(f"Message Batches, jobs not answered yet: {waiting}", highlight=False)
    for queue, count in broker.stray.items():
        if count:
            warn(f"{count} message(s) on {queue!r}, a queue no tierq worker reads ({STRAY_WHY[queue]})")


#: minutes of rate-limit counts ``tierq stats`` sums
RATE_LIMIT_MINUTES = 15


_RATE_COLUMNS = ("tier", "model", "calls", "429/1000", "waits", "refused", "wait p50", "wait p99", "out used")


def _rate_limit_rows(counts: dict[str, int], tiers: Mapping[str, Tier]) -> dict[str, dict[str, Any]]:
    """Per tier: its model's calls, 429s per 1,000 calls, waits, refused submits, output used/reserved."""
    rows: dict[str, dict[str, Any]] = {}
    for name, tier in tiers.items():
        calls = counts.get(f"calls:{name}", 0)
        reserved = counts.get(f"reserved_output:{tier.model}", 0)
        rows[name] = {
            "model": tier.model,
            "calls": calls,
            "api_429_per_1000": round(1000 * counts.get(f"429:{name}", 0) / calls, 2) if calls else None,
            "capacity_waits": counts.get(f"waits:{name}", 0),
            "admissions_refused": counts.get(f"refused:{name}", 0),
            "output_used_share": (
                round(counts.get(f"used_output:{tier.model}", 0) / reserved, 4) if reserved else None
            ),
        }
    return rows


#: why a message would be on a stray queue
STRAY_WHY = {
    "celery": "Celery's default queue: a producer that did not route to a tier's queue",
    "tierq.unroutable": "its routing key matched no tier's queue",
    "tierq.delivery-limit": "RabbitMQ returned it to its queue more often than the delivery limit",
}


@dataclass(frozen=True)
class BrokerCounts:
    """What the broker's Redis holds now, read in one round trip."""

    #: per tier: messages queued, taken and not acknowledged, recovered from dead workers
    deliveries: dict[str, dict[str, int]]
    #: messages on each queue no tierq worker reads
    stray: dict[str, int]


def broker_counts(settings: Settings) -> BrokerCounts:
    """Per tier deliveries and the stray queues' lengths (Redis brokers only; empty when unreachable)."""
    import redis

    from tierq.core.settings import get_tier_table
    from tierq.observe.metrics import queue_list_keys
    from tierq.store.keys import Keys, unacked_keys

    nothing = BrokerCounts({}, {})
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return nothing
    queues = {name: tier.queue for name, tier in get_tier_table().tiers.items()}
    prefix = settings.key_prefix
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        pipe = client.pipeline(transaction=False)
        for queue in (*queues.values(), *STRAY_QUEUES):
            for key in queue_list_keys(queue, prefix):
                pipe.llen(key)
        for queue in queues.values():
            pipe.hlen(prefix + unacked_keys(queue)[0])
            pipe.hget(Keys(prefix).recovered(), queue)
        replies = iter(pipe.execute())
    except redis.RedisError:
        return nothing
    finally:
        client.close()
    queued = {queue: sum(int(next(replies)) for _ in range(4)) for queue in (*queues.values(), *STRAY_QUEUES)}
    deliveries = {
        tier: {"queued": queued[queue], "unacked": int(next(replies)), "recovered": int(next(replies) or 0)}
        for tier, queue in queues.items()
    }
    return BrokerCounts(deliveries, {queue: queued[queue] for queue in STRAY_QUEUES})
