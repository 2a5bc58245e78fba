"""``tierq worker``: run a Celery worker pool for some tiers, after the start-up checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from tierq.contract.errors import TierqError
from tierq.contract.message import STRAY_QUEUES

if TYPE_CHECKING:
    from tierq.contract.tiers import Tier
    from tierq.core.settings import Settings
from tierq.ops.commands._common import err, fail, warn

__all__ = ["check_models", "worker"]


def worker(
    tier: Annotated[
        list[str], typer.Option("--tier", "-t", help="Tier to serve; repeat to serve several, first first.")
    ],
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", min=1, help="Threads; default: the tiers' sum.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Celery node name; default: TIERS@HOSTNAME.")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="Log level.")] = "INFO",
    pool: Annotated[str, typer.Option(help="Celery pool; threads suits IO-bound LLM calls.")] = "threads",
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics here; default TIERQ_METRICS_PORT (unset: off)."),
    ] = None,
) -> None:
    """Run a Celery worker pool that consumes only the given tiers' queues."""
    from tierq.core.settings import get_settings, get_tier_table

    try:
        tiers = get_tier_table()
    except TierqError as exc:
        raise fail(str(exc)) from None
    unknown = [t for t in tier if t not in tiers.tiers]
    if unknown:
        raise fail(f"unknown tier {unknown[0]!r}; tiers are: {', '.join(tiers.tiers)}")
    settings = get_settings()
    if settings.api_key() is None and not settings.anthropic_base_url:
        raise fail(
            "set ANTHROPIC_API_KEY (or TIERQ_ANTHROPIC_API_KEY_FILE), or ANTHROPIC_BASE_URL to a simulator"
        )
    from tierq.observe.metrics import observe_worker
    from tierq.ops.checks import redis_eviction_warning

    warning = redis_eviction_warning(settings.broker_url)
    if warning:
        warn(warning)
    chosen = list(dict.fromkeys(tier))
    if settings.check_models:
        check_models([tiers.tiers[t] for t in chosen], settings)
    queues = ",".join(tiers.tiers[t].queue for t in chosen)
    threads = concurrency or sum(tiers.tiers[t].concurrency for t in chosen)
    port = metrics_port if metrics_port is not None else settings.metrics_port
    observe_worker(chosen, threads)
    if port is not None:
        _serve_worker_metrics(port, settings.metrics_addr)
    from tierq.celery.app import get_app

    app = get_app()
    argv = [
        "worker",
        f"--queues={queues}",
        f"--pool={pool}",
        f"--concurrency={threads}",
        f"--hostname={name or '+'.join(chosen) + '@%h'}",
        f"--loglevel={loglevel}",
    ]
    if settings.task_events:
        argv.append("--task-events")
    app.worker_main(argv)


def check_models(tiers: list[Tier], settings: Settings) -> None:
    """Ask the Models API about each served model: warn on deprecated, refuse a retired or unknown one."""
    from tierq.llm.client import make_client
    from tierq.llm.models import DEPRECATED, check_served_models

    unchecked, served = check_served_models(make_client(settings), tiers)
    if unchecked is not None:
        warn(f"{unchecked}; models not checked")
        return
    for one in served:
        if one.status is None:
            warn(f"cannot ask the Models API about {one.model} ({one.error}); not checked")
            return
        if one.status.blocking:
            raise fail(
                f"tier {', '.join(one.tiers)}: {one.status.describe()} (TIERQ_CHECK_MODELS=false skips this)"
            )
        if one.status.lifecycle == DEPRECATED:
            warn(f"tier {', '.join(one.tiers)}: {one.status.describe()}")


def _serve_worker_metrics(port: int, addr: str) -> None:
    from tierq.core.settings import get_settings, get_tier_table
    from tierq.observe.metrics import QueueDepthCollector, serve_metrics
    from tierq.store.keys import unacked_keys

    settings = get_settings()
    extra = []
    if settings.broker_url.startswith(("redis://", "rediss://")):
        queues = {name: tier.queue for name, tier in get_tier_table().tiers.items()}
        extra.append(
            QueueDepthCollector(
                settings.broker_url,
                queues,
                settings.key_prefix,
                STRAY_QUEUES,
                unacked_key=lambda queue: unacked_keys(queue)[0],
            )
        )
    try:
        bound = serve_metrics(port, addr, extra)
    except OSError as exc:
        raise fail(f"cannot serve metrics on {addr}:{port}: {exc}") from None
    err.print(f"metrics on http://{addr}:{bound}/metrics", highlight=False)
