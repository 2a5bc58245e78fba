"""The ``tierq`` command: run a tier's worker pool, submit jobs, fetch results, run the simulator.

The top layer: it may import anything below. Each command imports what it runs when it runs, so
``tierq --help`` and a mistyped argument answer without loading Celery or the SDK, and ``tierq sim``
and ``tierq demo`` can say which extra is missing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tierq.contract.errors import TierqError
from tierq.contract.message import STRAY_QUEUES

if TYPE_CHECKING:
    from tierq.contract.tiers import Tier
    from tierq.core.settings import Settings
    from tierq.producer import Job

__all__ = ["cli", "main"]

cli = typer.Typer(
    name="tierq",
    help="Latency-tiered Celery workers for LLM summarization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error to stderr and return the exit to raise."""
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _extra(name: str) -> Iterator[None]:
    """A command whose optional dependencies are missing says which extra installs them."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise _fail(f"this command needs {exc.name}: pip install 'tierq[{name}]'") from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@cli.command()
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
        raise _fail(str(exc)) from None
    unknown = [t for t in tier if t not in tiers.tiers]
    if unknown:
        raise _fail(f"unknown tier {unknown[0]!r}; tiers are: {', '.join(tiers.tiers)}")
    settings = get_settings()
    if settings.api_key() is None and not settings.anthropic_base_url:
        raise _fail(
            "set ANTHROPIC_API_KEY (or TIERQ_ANTHROPIC_API_KEY_FILE), or ANTHROPIC_BASE_URL to a simulator"
        )
    from tierq.observe.metrics import observe_worker
    from tierq.ops.checks import redis_eviction_warning

    warning = redis_eviction_warning(settings.broker_url)
    if warning:
        _warn(warning)
    chosen = list(dict.fromkeys(tier))
    if settings.check_models:
        _check_models([tiers.tiers[t] for t in chosen], settings)
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


def _warn(message: str) -> None:
    _err.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _tier_models(tiers: list[Tier]) -> dict[str, list[str]]:
    """model id → the tiers that call it (their model and fallback model)."""
    models: dict[str, list[str]] = {}
    for one in tiers:
        for model in (one.model, one.fallback_model):
            if model:
                models.setdefault(model, []).append(one.name)
    return models


def _check_models(tiers: list[Tier], settings: Settings) -> None:
    """Ask the Models API about each served model: warn on deprecated, refuse a retired or unknown one."""
    import anthropic

    from tierq.llm.client import make_client
    from tierq.llm.models import DEPRECATED, model_status

    client = make_client(settings)
    try:
        client.with_options(timeout=5.0, max_retries=1).models.list(limit=1)
    except anthropic.NotFoundError:
        _warn("the API at ANTHROPIC_BASE_URL serves no Models API (GET /v1/models: 404); models not checked")
        return
    except anthropic.APIError as exc:
        _warn(f"cannot reach the Models API ({type(exc).__name__}); models not checked")
        return
    for model, names in _tier_models(tiers).items():
        try:
            status = model_status(client, model)
        except anthropic.APIError as exc:
            _warn(f"cannot ask the Models API about {model} ({type(exc).__name__}); not checked")
            return
        if status.blocking:
            raise _fail(f"tier {', '.join(names)}: {status.describe()} (TIERQ_CHECK_MODELS=false skips this)")
        if status.lifecycle == DEPRECATED:
            _warn(f"tier {', '.join(names)}: {status.describe()}")


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
        raise _fail(f"cannot serve metrics on {addr}:{port}: {exc}") from None
    _err.print(f"metrics on http://{addr}:{bound}/metrics", highlight=False)


def _read_text(text: str | None, file: Path | None) -> str:
    if file is not None and text is not None:
        raise _fail("give the text as an argument or with --file, not both")
    if file is None:
        if text is None:
            raise _fail("give the text to summarize as an argument, or --file PATH (- for stdin)")
        return text
    if str(file) == "-":
        return sys.stdin.read()
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read --file {file}: {exc}") from None


@cli.command()
def submit(
    text: Annotated[str | None, typer.Argument(help="Text to summarize (or use --file).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the text from a file; - is stdin.")
    ] = None,
    urgency: Annotated[
        str,
        typer.Option(
            "--urgency",
            "-u",
            help="critical, high, normal, low or bulk (Message Batches: half price, within 24 h).",
        ),
    ] = "normal",
    instructions: Annotated[str | None, typer.Option(help="What kind of summary to write.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Output cap, at most the tier's.")] = None,
    job_id: Annotated[str | None, typer.Option(help="Your own job id (idempotency key).")] = None,
    metadata: Annotated[str | None, typer.Option(help="A JSON object stored with the result.")] = None,
    deadline: Annotated[
        float | None, typer.Option(help="Seconds the job may take, at most the tier's deadline.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the summary as it is generated, then its figures.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait; default: the tier's deadline.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Submit one job; print its id, with --wait its result, with --stream its text as it comes."""
    from tierq.core.settings import get_tier_table
    from tierq.producer import submit as submit_job

    if stream and (wait or as_json):
        raise _fail("--stream prints text as it comes; use --wait --json for the result as JSON")
    body = _read_text(text, file)
    meta: Any = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise _fail(f"metadata: not valid JSON: {exc}") from None
    try:
        job = submit_job(
            body, urgency, instructions, max_tokens, job_id, meta, stream=stream, deadline_s=deadline
        )
    except TierqError as exc:
        raise _fail(str(exc)) from None
    if job.duplicate:
        _err.print(f"job {job.id} was already submitted: nothing enqueued", highlight=False)
    if stream:
        tier = get_tier_table().for_urgency(urgency)
        _stream_and_print(job, timeout if timeout is not None else tier.deadline_s + 5)
        return
    if not wait:
        if as_json:
            _print_json({"job_id": job.id})
        else:
            sys.stdout.write(job.id + "\n")
        return
    tier = get_tier_table().for_urgency(urgency)
    _wait_and_print(job.id, timeout if timeout is not None else tier.deadline_s + 5, as_json)


@cli.command()
def result(
    job_id: Annotated[str, typer.Argument(help="The job id printed by submit.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a job's result, or its status if it has not ended (``unknown``: no such job; exit 1)."""
    from tierq.producer import get_job

    job = get_job(job_id)
    if not wait and not job.ready():
        status = job.status()
        if as_json:
            _print_json({"job_id": job_id, "status": status})
        else:
            sys.stdout.write(f"{job_id} {status}\n")
        if status == "unknown":
            raise typer.Exit(1)
        return
    _wait_and_print(job_id, timeout, as_json)


def _stream_and_print(job: Job, timeout: float) -> None:
    """Text to stdout as it arrives, then one line of figures to stderr."""
    from tierq.producer import Restarted

    try:
        for item in job.stream(timeout=timeout):
            if isinstance(item, str):
                sys.stdout.write(item)
                sys.stdout.flush()
                continue
            if isinstance(item, Restarted):
                sys.stdout.write("\n")
                _err.print("[yellow]the worker was lost mid-reply; the job started over:[/]", highlight=False)
                continue
            timings = item.timings
            sys.stdout.write("\n")
            _err.print(
                f"{item.job_id} {item.tier} · {item.model} · stop {item.stop_reason} · "
                f"{item.usage.output_tokens} tokens · first text after {timings.producer_ttft_ms} ms "
                f"(queue {timings.queue_wait_ms} ms, model TTFT {timings.ttft_ms} ms) · "
                f"total {timings.total_ms} ms",
                highlight=False,
            )
    except TierqError as exc:
        sys.stdout.write("\n")
        raise _fail(str(exc), code=1) from None


def _wait_and_print(job_id: str, timeout: float, as_json: bool) -> None:
    from tierq.producer import get_job

    try:
        value = get_job(job_id).result(timeout=timeout)
    except TierqError as exc:
        raise _fail(str(exc), code=1) from None
    if as_json:
        _print_json(value.to_json())
        return
    out = Console()
    timings, usage = value.timings, value.usage
    out.print(
        f"[bold]{value.job_id}[/] {value.tier} · {value.model} · stop {value.stop_reason} · "
        f"{usage.input_tokens}→{usage.output_tokens} tokens · queue {timings.queue_wait_ms} ms · "
        f"TTFT {timings.ttft_ms} ms · total {timings.total_ms} ms · ${value.cost_usd}",
        highlight=False,
    )
    out.print(value.summary, highlight=False, markup=False)


@cli.command()
def tiers() -> None:
    """Show the tier table and which urgencies each tier serves."""
    from tierq.core.settings import get_tier_table

    try:
        table_data = get_tier_table()
    except TierqError as exc:
        raise _fail(str(exc)) from None
    table = Table(title="tierq tiers")
    for column in (
        "tier",
        "urgencies",
        "queue",
        "model",
        "max_tokens",
        "effort",
        "deadline",
        "threads",
        "io",
        "path",
    ):
        table.add_column(column)
    for tier in table_data.tiers.values():
        urgencies = ", ".join(u for u, t in table_data.urgencies.items() if t == tier.name) or "-"
        table.add_row(
            tier.name, urgencies, tier.queue, tier.model, str(tier.max_tokens), tier.effort or "-",
            f"{tier.deadline_s:g} s", str(tier.concurrency), tier.io, _path(tier),
        )  # fmt: skip
    _console().print(table)


def _path(tier: Tier) -> str:
    """How the tier's jobs reach the model: one streamed Messages call each, or Message Batches."""
    if tier.batch is None:
        return "messages"
    if tier.batch_when_slack_s is None:
        return "batch"
    return f"batch if slack > {tier.batch_when_slack_s:g} s"


@cli.command()
def schemas(
    out: Annotated[Path, typer.Option(help="Where to write them.")] = Path("docs/schemas/v1"),
    check: Annotated[bool, typer.Option("--check", help="Only compare; exit 1 when a file differs.")] = False,
) -> None:
    """Write the contract's JSON Schemas (job, headers, body, result, status), generated from the models."""
    from tierq.contract.schemas import rendered

    stale = []
    for name, text in rendered().items():
        path = out / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        sys.stdout.write(f"{path}\n")
    if stale:
        raise _fail(f"out of date (run tierq schemas): {', '.join(stale)}", code=1)


#: the columns of Flower's task list: each job's queue (its tier) and timings, never its arguments or result
FLOWER_TASK_COLUMNS = "name,uuid,state,routing_key,received,started,runtime,retries,worker"


@cli.command()
def flower(
    port: Annotated[int, typer.Option(help="Port for Flower's UI and API.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    unauthenticated: Annotated[
        bool, typer.Option("--unauthenticated", help="Run without basic auth (local use only).")
    ] = False,
) -> None:
    """Run Flower for tierq, behind basic auth from TIERQ_FLOWER_BASIC_AUTH (user:password)."""
    from tierq.core.settings import get_settings

    auth = get_settings().flower_basic_auth
    if auth is None and not unauthenticated:
        raise _fail("set TIERQ_FLOWER_BASIC_AUTH=user:password, or pass --unauthenticated for local use")
    if auth is not None:
        value = auth.get_secret_value()
        if ":" not in value:
            raise _fail("TIERQ_FLOWER_BASIC_AUTH must be user:password")
        # through the environment, not argv, so the password stays out of `ps`
        os.environ["FLOWER_BASIC_AUTH"] = value
    else:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    from tierq.celery.app import get_app

    app = get_app()
    # workers send task events only when asked: ask the running ones now, not at Flower's first
    # periodic request 5 s from now (it goes on asking, for workers that start later)
    with suppress(Exception):
        app.control.enable_events()
    app.start(["flower", f"--port={port}", f"--address={address}", f"--tasks_columns={FLOWER_TASK_COLUMNS}"])


@cli.command()
def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            envvar="TIERQ_API_TOKENS_FILE", help="TOML or JSON: producer name = sha256 hex of its token."
        ),
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option(envvar="TIERQ_API_TOKENS", help="Token hashes as name:sha256hex,name2:sha256hex."),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option("--insecure-no-auth", help="No tokens: every caller is 'anonymous' (local use)."),
    ] = False,
) -> None:
    """Serve the HTTP API: submit, read, stream and cancel jobs (docs/http.md)."""
    with _extra("api"):
        import uvicorn

        from tierq.api import load_tokens, make_api
    from tierq import Producer
    from tierq.core.settings import get_settings
    from tierq.observe.logging import configure_logging

    try:
        table = load_tokens(tokens_file, tokens)
        settings = get_settings()
        producer = Producer(settings)
    except TierqError as exc:
        raise _fail(str(exc)) from None
    if not len(table) and not insecure_no_auth:
        raise _fail(
            "no API tokens: set TIERQ_API_TOKENS_FILE (or --tokens-file) or TIERQ_API_TOKENS, "
            "or pass --insecure-no-auth for local use (see docs/http.md)"
        )
    if not len(table):
        _warn("serving without tokens (--insecure-no-auth): every caller is the producer 'anonymous'")
    configure_logging(settings)
    app = make_api(producer, table if len(table) else None)
    who = f"producers: {', '.join(table.names)}" if len(table) else "no auth"
    _err.print(f"tierq API on http://{host}:{port} ({who})", highlight=False)
    # SIGTERM: stop taking connections, give open event streams 10 s (clients resume with Last-Event-ID)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )


@cli.command()
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
        raise _fail("stats need a Redis result backend (TIERQ_RESULT_BACKEND or TIERQ_BROKER_URL)")
    batch_tiers = [name for name, tier in tier_table.items() if tier.batch is not None]
    try:
        summary = summarize(stream.recent(last))
        counts = LimiterStats(stream.client, settings.key_prefix).read(RATE_LIMIT_MINUTES)
        batches = BatchStore(stream.client, settings.key_prefix)
        parked = {tier: batches.pending_count(tier) for tier in batch_tiers}
        in_flight = batches.in_flight_jobs() if batch_tiers else Counter()
    except Exception as exc:
        raise _fail(f"cannot read stats: {exc}", code=1) from None
    broker = _broker_counts(settings)
    deliveries = broker.deliveries
    limits = _rate_limit_rows(counts, tier_table)
    if as_json:
        for tier, row in summary.items():
            row.update(deliveries.get(tier, {}))
            row.update(limits.get(tier, {}))
        for tier, count in parked.items():
            summary.setdefault(tier, {}).update(batch_parked=count, batch_in_flight=in_flight[tier])
        _print_json(summary)
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
            *(_ms(row[k]) for k in ("queue_wait_p50_ms", "queue_wait_p95_ms", "ttft_p50_ms", "ttft_p95_ms",
                                    "total_p50_ms", "total_p95_ms")),
            _ms(row["output_tokens_per_s_p50"]), _share(row["cache_hit_ratio"]), f"{row['cost_usd']:.4f}",
        )  # fmt: skip
    _console().print(table)
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
                tier, row["model"], str(row["calls"]), _per_1000(row["api_429_per_1000"]),
                str(row["capacity_waits"]), str(row["admissions_refused"]),
                _ms(jobs.get("limiter_wait_p50_ms")), _ms(jobs.get("limiter_wait_p99_ms")),
                "-" if used is None else f"{used:.0%}",
            )  # fmt: skip
        _console().print(rate)
        _err.print(
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
        _console().print(now)
        _err.print(
            "unacked: taken by a worker, not acknowledged yet (running, or its worker died less than "
            "TIERQ_LEASE_S ago); recovered: put back after their worker died, since the broker started",
            highlight=False,
        )
    if any(parked.values()) or any(in_flight.values()):
        waiting = ", ".join(f"{tier} {parked[tier]} parked, {in_flight[tier]} in batches" for tier in parked)
        _console().print(f"Message Batches, jobs not answered yet: {waiting}", highlight=False)
    for queue, count in broker.stray.items():
        if count:
            _warn(f"{count} message(s) on {queue!r}, a queue no tierq worker reads ({_STRAY_WHY[queue]})")


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


def _per_1000(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


#: why a message would be on a stray queue
_STRAY_WHY = {
    "celery": "Celery's default queue: a producer that did not route to a tier's queue",
    "tierq.unroutable": "its routing key matched no tier's queue",
    "tierq.delivery-limit": "RabbitMQ returned it to its queue more often than the delivery limit",
}


@dataclass(frozen=True)
class _BrokerCounts:
    """What the broker's Redis holds now, read in one round trip."""

    #: per tier: messages queued, taken and not acknowledged, recovered from dead workers
    deliveries: dict[str, dict[str, int]]
    #: messages on each queue no tierq worker reads
    stray: dict[str, int]


def _broker_counts(settings: Settings) -> _BrokerCounts:
    """Per tier deliveries and the stray queues' lengths (Redis brokers only; empty when unreachable)."""
    import redis

    from tierq.core.settings import get_tier_table
    from tierq.observe.metrics import queue_list_keys
    from tierq.store.keys import Keys, unacked_keys

    nothing = _BrokerCounts({}, {})
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
    return _BrokerCounts(deliveries, {queue: queued[queue] for queue in STRAY_QUEUES})


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _console(record: bool = False) -> Console:
    """stdout, 120 columns wide off a terminal (rich would assume 80)."""
    return Console(width=None if sys.stdout.isatty() else 120, record=record)


@cli.command()
def sim(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    time_scale: Annotated[
        float, typer.Option(min=0.0, help="Multiplies every delay: 1 real speed, 0.1 ten times faster.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for the latency jitter.")] = None,
    limits: Annotated[
        str | None,
        typer.Option(help="Per-model rate limits per minute, rpm=N,itpm=N,otpm=N (default: generous)."),
    ] = None,
) -> None:
    """Run the Anthropic-compatible simulator (point ANTHROPIC_BASE_URL at it)."""
    with _extra("sim"):
        from tierq.sim import SimConfig, serve
        from tierq.sim.ratelimit import DEFAULT_LIMITS, Limits

    try:
        parsed = Limits.parse(limits) if limits is not None else DEFAULT_LIMITS
    except ValueError as exc:
        raise _fail(f"--limits: {exc}") from None
    _err.print(
        f"simulator on http://{host}:{port} (time scale {time_scale}, limits {parsed}); "
        f"ANTHROPIC_BASE_URL=http://{host}:{port}"
    )
    serve(host, port, SimConfig(time_scale=time_scale, seed=seed, limits=parsed))


@cli.command()
def demo(
    jobs: Annotated[int, typer.Option(min=1, max=5000, help="How many jobs to submit.")] = 60,
    mix: Annotated[
        str | None, typer.Option(help="Urgency weights, e.g. critical=0.2,high=0.2,normal=0.4,low=0.2.")
    ] = None,
    docs: Annotated[
        Path | None, typer.Option(help="Summarize the .txt/.md files under this directory instead.")
    ] = None,
    time_scale: Annotated[
        float,
        typer.Option(
            min=0.0, help="Simulator speed: 1 is the published model speeds, 0.25 four times faster."
        ),
    ] = 0.25,
    flower: Annotated[bool, typer.Option(help="Also start Flower (basic auth, credentials printed).")] = True,
    svg: Annotated[Path | None, typer.Option(help="Also save what the demo printed as SVG.")] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep Flower and the pools up after the run, until Ctrl-C.")
    ] = False,
) -> None:
    """Start Redis, the simulator, one pool per tier and Flower; run a mixed workload; watch it live."""
    with _extra("demo"):
        from tierq.ops.demo import run_demo

    console = _console(record=svg is not None)
    try:
        code = run_demo(
            jobs=jobs, time_scale=time_scale, mix=mix, docs=docs, flower=flower, console=console, keep=keep
        )
    except TierqError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        _err.print("interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None
    if svg is not None:
        console.save_svg(str(svg), title="tierq demo")
    raise typer.Exit(code)


dlq = typer.Typer(help="Dead letters: jobs that failed for good, with why.", no_args_is_help=True)
cli.add_typer(dlq, name="dlq")


def _store() -> Any:
    from tierq.core.settings import get_settings
    from tierq.store.deadletter import DeadLetterStore

    store = DeadLetterStore.from_settings(get_settings())
    if store is None:
        raise _fail("dead letters need a Redis result backend (TIERQ_RESULT_BACKEND or TIERQ_BROKER_URL)")
    return store


@dlq.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List dead letters (payloads redacted)."""
    letters = [letter.summary() for letter in _store().list(limit)]
    if as_json:
        _print_json(letters)
        return
    table = Table(title=f"dead letters ({len(letters)})")
    # whole job ids, never cut: they are what `dlq show` and `dlq replay` take
    longest = max((len(row["job_id"]) for row in letters), default=6)
    table.add_column("job id", no_wrap=True, min_width=longest)
    for column in ("tier", "reason", "error", "attempts", "failed at", "payload"):
        table.add_column(column)
    for row in letters:
        failed_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["failed_at"]))
        error = f"{row['error_type']}: {row['error']}"[:60]
        table.add_row(
            row["job_id"],
            row["tier"] or "-",
            row["reason"],
            error,
            str(row["attempts"]),
            failed_at,
            row["payload"],
        )
    _console().print(table)


@dlq.command("show")
def dlq_show(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    payload: Annotated[bool, typer.Option("--payload", help="Include the job's text.")] = False,
) -> None:
    """Show one dead letter as JSON (its text only with --payload)."""
    letter = _store().get(job_id)
    if letter is None:
        raise _fail(f"no dead letter for {job_id!r}", code=1)
    shown = letter.summary()
    if payload:
        shown["payload"] = letter.payload
    _print_json(shown)


@dlq.command("replay")
def dlq_replay(
    job_id: Annotated[str | None, typer.Argument(help="The job id to replay.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Submit dead-lettered jobs again under their ids; print each id."""
    from tierq.producer import replay

    if (job_id is not None) == replay_all:
        raise _fail("give a job id, or --all (not both)")
    ids = [letter.job_id for letter in _store().list(10_000)] if replay_all else [job_id or ""]
    failed = 0
    for one in ids:
        try:
            sys.stdout.write(replay(one).id + "\n")
        except TierqError as exc:
            failed += 1
            _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


#: doctor's verdicts, worst last
_OK, _NOTE, _WARN, _FAIL = "ok", "note", "warn", "FAIL"
_STYLE = {_OK: "green", _NOTE: "cyan", _WARN: "yellow", _FAIL: "bold red"}


def _redis_check(url: str) -> tuple[str, str]:
    import redis

    if not url.startswith(("redis://", "rediss://", "unix://")):
        return _OK, "not Redis: not checked here"
    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        return _FAIL, f"unreachable: {type(exc).__name__}"
    finally:
        client.close()
    return _OK, "answers"


@cli.command()
def doctor() -> None:
    """Check what tierq needs: broker, backend, Redis policy, the API and key, each tier's model and price."""
    import anthropic

    from tierq.core.settings import get_settings, get_tier_table
    from tierq.llm.caching import system_prompt_cache
    from tierq.llm.client import make_client
    from tierq.llm.models import DEPRECATED, model_status
    from tierq.llm.pricing import PRICES
    from tierq.ops.checks import redis_eviction_warning

    rows: list[tuple[str, str, str]] = []
    settings = get_settings()
    try:
        table_data = get_tier_table()
    except TierqError as exc:
        raise _fail(str(exc)) from None
    rows.append(("broker", *_redis_check(settings.broker_url)))
    if settings.backend_url != settings.broker_url:
        rows.append(("result backend", *_redis_check(settings.backend_url)))
    if rows[0][1] == _OK:
        warning = redis_eviction_warning(settings.broker_url)
        policy = "redis maxmemory-policy"
        rows.append((policy, _WARN, warning) if warning else (policy, _OK, "noeviction"))
        for queue, count in _broker_counts(settings).stray.items():
            label = f"stray queue {queue}"
            rows.append(
                (label, _WARN, f"{count} message(s): {_STRAY_WHY[queue]}") if count else (label, _OK, "empty")
            )
    where = settings.anthropic_base_url or "https://api.anthropic.com"
    api_ok = False
    if settings.api_key() is None and not settings.anthropic_base_url:
        rows.append(("API", _FAIL, "no ANTHROPIC_API_KEY (or its _FILE), no ANTHROPIC_BASE_URL"))
    else:
        client = make_client(settings)
        try:
            client.with_options(timeout=5.0, max_retries=1).models.list(limit=1)
            rows.append(("API", _OK, f"{where}: reachable, key accepted"))
            api_ok = True
        except anthropic.AuthenticationError:
            rows.append(("API", _FAIL, f"{where}: the API key was rejected (401)"))
        except anthropic.APIError as exc:
            rows.append(("API", _FAIL, f"{where}: {type(exc).__name__}"))
    models = _tier_models(list(table_data.tiers.values()))
    for model, names in models.items():
        label = f"model {model} ({', '.join(names)})"
        if api_ok:
            try:
                status = model_status(client, model)
                verdict = _FAIL if status.blocking else _WARN if status.lifecycle == DEPRECATED else _OK
                rows.append((label, verdict, status.describe()))
            except anthropic.APIError as exc:
                rows.append((label, _WARN, f"not checked: {type(exc).__name__}"))
        price = PRICES.get(model)
        if price is None:
            rows.append((f"price {model}", _WARN, "not in tierq/llm/prices.toml: cost_usd will be null"))
        else:
            rows.append((f"price {model}", _OK, f"${price.input:g} in / ${price.output:g} out per MTok"))
    if not settings.prompt_cache:
        rows.append(("prompt cache", _NOTE, "off (TIERQ_PROMPT_CACHE=false)"))
    else:
        for tier in table_data.tiers.values():
            cached, why = system_prompt_cache(tier.model, tier.system_prompt)
            rows.append((f"prompt cache {tier.name}", _OK if cached else _NOTE, why))
    table = Table(title="tierq doctor")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for check, verdict, detail in rows:
        table.add_row(check, f"[{_STYLE[verdict]}]{verdict}[/]", detail)
    _console().print(table)
    if any(verdict == _FAIL for _, verdict, _ in rows):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point: tierq's own errors end as one line on stderr, exit status 1."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        cli()
    except TierqError as exc:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
