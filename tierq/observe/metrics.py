"""Prometheus metrics of the workers, served over HTTP by each worker process.

Names follow celery-exporter where they overlap (``celery_task_*_total``, ``celery_task_runtime``,
``celery_queue_length``), with ``tier`` and ``model`` labels added; the LLM figures are ``tierq_*``.
With ``PROMETHEUS_MULTIPROC_DIR`` set (a prefork pool), values are shared through files as
prometheus-client's multiprocess mode does; the default threads pool needs nothing of the kind.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from tierq.contract.result import JobResult

__all__ = [
    "ADMISSIONS_REFUSED",
    "API_CALLS",
    "API_RATE_LIMITED",
    "COST",
    "JOB_SECONDS",
    "LIMITER_TOKENS",
    "LIMITER_WAIT",
    "LIMITER_WAITS",
    "MESSAGES_REJECTED",
    "QUEUE_WAIT",
    "TASKS_FAILED",
    "TASKS_REFUSED",
    "TASKS_RETRIED",
    "TASKS_SUCCEEDED",
    "TOKENS",
    "TOKENS_PER_S",
    "TTFT",
    "QueueDepthCollector",
    "observe_admission_refused",
    "observe_call",
    "observe_capacity_wait",
    "observe_completed",
    "observe_failed",
    "observe_refused",
    "observe_rejected",
    "observe_retried",
    "queue_list_keys",
    "serve_metrics",
]

#: the task name label, as celery-exporter sets it
_TASK = "tierq.summarize"
_HOST = socket.gethostname()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
_JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600, 1800)
_RATE_BUCKETS = (5, 10, 20, 30, 40, 50, 60, 80, 100, 125, 150, 200, 300, 500, 1000)

TASKS_SUCCEEDED = Counter(
    "celery_task_succeeded",
    "Jobs that ended with a summary.",
    ["name", "hostname", "queue_name", "tier", "model"],
)
TASKS_FAILED = Counter(
    "celery_task_failed",
    "Jobs that ended in failure.",
    ["name", "hostname", "queue_name", "tier", "exception"],
)
TASKS_RETRIED = Counter(
    "celery_task_retried",
    "Attempts that failed and were retried.",
    ["name", "hostname", "queue_name", "tier", "exception"],
)
TASKS_REFUSED = Counter(
    "tierq_jobs_refused",
    "Jobs that ended because the model refused (stop_reason refusal).",
    ["queue_name", "tier"],
)
RUNTIME = Histogram(
    "celery_task_runtime",
    "Seconds the successful attempt ran in the worker.",
    ["name", "hostname", "queue_name", "tier"],
    buckets=_JOB_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "tierq_queue_wait_seconds",
    "Enqueue to first attempt started.",
    ["tier", "model"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "tierq_ttft_seconds", "Request sent to first text token.", ["tier", "model"], buckets=_TTFT_BUCKETS
)
JOB_SECONDS = Histogram(
    "tierq_job_duration_seconds",
    "Enqueue to result, retries included.",
    ["tier", "model"],
    buckets=_JOB_BUCKETS,
)
TOKENS_PER_S = Histogram(
    "tierq_output_tokens_per_second",
    "Output tokens per second after the first token.",
    ["tier", "model"],
    buckets=_RATE_BUCKETS,
)
IN_FLIGHT = Gauge(
    "tierq_jobs_in_flight",
    "Jobs this worker process is running now, by tier.",
    ["tier"],
    multiprocess_mode="livesum",
)
WORKER_UP = Gauge(
    "tierq_worker_up",
    "1 for each worker process serving the tier (sum by tier: the tier's live workers).",
    ["tier"],
    multiprocess_mode="livesum",
)
WORKER_THREADS = Gauge(
    "tierq_worker_threads",
    "Jobs a worker process serving the tier runs at once (its pool's threads).",
    ["tier"],
    multiprocess_mode="livesum",
)
WORKER_SATURATION = Gauge(
    "tierq_worker_saturation",
    "This worker process's jobs in flight over its threads (1: every thread busy), by tier served.",
    ["tier"],
    multiprocess_mode="max",
)
RECOVERED = Counter(
    "tierq_deliveries_recovered",
    "Deliveries of dead workers this worker put back on their queue (their lease lapsed).",
    ["queue_name"],
)
MESSAGES_REJECTED = Counter(
    "tierq_messages_rejected",
    "Deliveries that were not a tierq job message, dead-lettered and acknowledged, by what was wrong.",
    ["queue_name", "kind"],
)
TOKENS = Counter("tierq_tokens", "Tokens billed, by kind (direction).", ["tier", "model", "direction"])
API_CALLS = Counter(
    "tierq_api_calls", "Calls made to the model that the shared rate limit let through.", ["tier", "model"]
)
API_RATE_LIMITED = Counter(
    "tierq_api_rate_limited", "Calls the API answered 429 (not the spend limit).", ["tier", "model"]
)
LIMITER_WAIT = Histogram(
    "tierq_ratelimit_wait_seconds",
    "Per completed job: time waited for the shared rate limit, in a thread and back in the queue.",
    ["tier"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300),
)
LIMITER_WAITS = Counter(
    "tierq_ratelimit_capacity_waits",
    "Attempts that found no capacity within the wait a thread may hold (sent back, or ended rate limited).",
    ["tier"],
)
LIMITER_TOKENS = Counter(
    "tierq_ratelimit_tokens",
    "Tokens reserved from the shared rate limit before calls, and used by them, by kind.",
    ["model", "kind", "stage"],
)
ADMISSIONS_REFUSED = Counter(
    "tierq_admissions_refused",
    "Submits refused because the job could not start before its deadline (DeadlineUnmeetableError).",
    ["tier"],
)
COST = Counter("tierq_cost_usd", "Dollars spent, from the price table.", ["tier", "model"])


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def observe_completed(result: JobResult, queue: str | None) -> None:
    """Record a job that produced a summary."""
    tier, model, timings, usage = result.tier, result.model, result.timings, result.usage
    TASKS_SUCCEEDED.labels(_TASK, _HOST, queue or "", tier, model).inc()
    RUNTIME.labels(_TASK, _HOST, queue or "", tier).observe(timings.llm_ms / 1000)
    for histogram, value in (
        (QUEUE_WAIT, _seconds(timings.queue_wait_ms)),
        (TTFT, _seconds(timings.ttft_ms)),
        (JOB_SECONDS, _seconds(timings.total_ms)),
        (TOKENS_PER_S, timings.output_tokens_per_s),
    ):
        if value is not None:
            histogram.labels(tier, model).observe(value)
    for direction, tokens in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_write", usage.cache_creation_input_tokens),
        ("cache_read", usage.cache_read_input_tokens),
        ("thinking", usage.thinking_tokens),
    ):
        if tokens:
            TOKENS.labels(tier, model, direction).inc(tokens)
    if result.cost_usd:
        COST.labels(tier, model).inc(result.cost_usd)
    LIMITER_WAIT.labels(tier).observe(timings.limiter_wait_ms / 1000)


def observe_call(
    tier: str, model: str, reserved: tuple[int, int], used: tuple[int, int], rate_limited: bool = False
) -> None:
    """A call the shared rate limit let through: input and output tokens ``reserved`` and ``used``."""
    API_CALLS.labels(tier, model).inc()
    if rate_limited:
        API_RATE_LIMITED.labels(tier, model).inc()
    for stage, (input_tokens, output_tokens) in (("reserved", reserved), ("used", used)):
        LIMITER_TOKENS.labels(model, "input", stage).inc(input_tokens)
        LIMITER_TOKENS.labels(model, "output", stage).inc(output_tokens)


def observe_capacity_wait(tier: str) -> None:
    """An attempt that found no capacity within the wait its thread may hold."""
    LIMITER_WAITS.labels(tier).inc()


def observe_admission_refused(tier: str) -> None:
    """A submit refused: the job could not have started before its deadline."""
    ADMISSIONS_REFUSED.labels(tier).inc()


def observe_rejected(queue: str | None, kind: str) -> None:
    """A malformed delivery (``kind``: one of ``tierq.celery.consumer.KINDS``)."""
    MESSAGES_REJECTED.labels(queue or "", kind).inc()


def observe_refused(tier: str, queue: str | None) -> None:
    """Record a job the model refused."""
    TASKS_REFUSED.labels(queue or "", tier).inc()


def observe_failed(tier: str, queue: str | None, exception: str) -> None:
    """Record a job that ended in failure."""
    TASKS_FAILED.labels(_TASK, _HOST, queue or "", tier, exception).inc()


def observe_retried(tier: str, queue: str | None, exception: str) -> None:
    """Record an attempt that failed and will be retried."""
    TASKS_RETRIED.labels(_TASK, _HOST, queue or "", tier, exception).inc()


#: jobs running in this process, by tier (what saturation is computed from)
_running: collections.Counter[str] = collections.Counter()
_running_lock = threading.Lock()


def observe_worker(tiers: Iterable[str], threads: int) -> None:
    """Say that this process serves ``tiers`` with ``threads`` threads (up, threads, saturation)."""
    served = list(tiers)

    def saturation() -> float:
        with _running_lock:
            running = sum(_running[tier] for tier in served)
        return running / threads if threads else 0.0

    for tier in served:
        WORKER_UP.labels(tier).set(1)
        WORKER_THREADS.labels(tier).set(threads)
        WORKER_SATURATION.labels(tier).set_function(saturation)


@contextmanager
def in_flight(tier: str) -> Iterator[None]:
    """Count a job of ``tier`` as in flight while the block runs."""
    gauge = IN_FLIGHT.labels(tier)
    with _running_lock:
        _running[tier] += 1
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()
        with _running_lock:
            _running[tier] -= 1


def observe_recovered(queue: str, count: int = 1) -> None:
    """Record deliveries of a dead worker put back on ``queue``."""
    RECOVERED.labels(queue).inc(count)


def queue_list_keys(queue: str, key_prefix: str = "") -> list[str]:
    """The Redis lists that hold a kombu queue's messages: the queue's own, and the sub-lists
    ``QUEUE\\x06\\x16N`` where kombu keeps priorities 3, 6 and 9 (their lengths add up to the queue's)."""
    return [key_prefix + name for name in [queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9))]]


class QueueDepthCollector(Collector):
    """``celery_queue_length``: messages waiting per tier queue, read from Redis at scrape time."""

    def __init__(
        self,
        redis_url: str,
        queues: dict[str, str],
        key_prefix: str = "",
        stray: Iterable[str] = (),
        unacked_key: Callable[[str], str] | None = None,
    ) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._queues = queues  # tier -> queue
        self._stray = tuple(stray)
        self._prefix = key_prefix
        #: the hash of a queue's unacknowledged deliveries, without the prefix (None: not read)
        self._unacked_key = unacked_key

    def _keys(self, queue: str) -> list[str]:
        return queue_list_keys(queue, self._prefix)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "celery_queue_length", "Messages waiting in each tier's queue.", labels=["queue_name", "tier"]
        )
        stray = GaugeMetricFamily(
            "tierq_stray_messages",
            "Messages on queues no tierq worker reads (Celery's default queue, unroutable messages).",
            labels=["queue_name"],
        )
        unacked = GaugeMetricFamily(
            "tierq_unacked_messages",
            "Deliveries taken by a worker and not acknowledged yet (running, or their worker died "
            "less than a lease ago), per tier queue.",
            labels=["queue_name", "tier"],
        )
        try:
            pipe = self._client.pipeline(transaction=False)
            for queue in (*self._queues.values(), *self._stray):
                for key in self._keys(queue):
                    pipe.llen(key)
            if self._unacked_key is not None:
                for queue in self._queues.values():
                    pipe.hlen(self._prefix + self._unacked_key(queue))
            lengths: Iterable[int] = pipe.execute()
        except Exception:  # Redis away: report nothing rather than fail the scrape
            return
        values = iter(lengths)
        for tier, queue in self._queues.items():
            family.add_metric([queue, tier], sum(next(values) for _ in range(4)))
        for queue in self._stray:
            stray.add_metric([queue], sum(next(values) for _ in range(4)))
        yield family
        yield stray
        if self._unacked_key is not None:
            for tier, queue in self._queues.items():
                unacked.add_metric([queue, tier], next(values))
            yield unacked


_served: dict[str, Any] = {}
_serve_lock = threading.Lock()


def serve_metrics(port: int, addr: str = "127.0.0.1", extra: Iterable[Collector] = ()) -> int:
    """Serve ``/metrics`` on ``port`` (0 picks one) from this process, once; return the port."""
    with _serve_lock:
        if "port" in _served:
            return int(_served["port"])
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
        for collector in extra:
            registry.register(collector)
        server, _thread = start_http_server(port, addr=addr, registry=registry)
        _served["port"] = server.server_port
        return int(server.server_port)
