"""The chaos suite's own world: a Redis it may kill (AOF on), the simulator behind a stream counter,
real worker subprocesses it kills, and a producer subprocess; plus the per-scenario counts table.

Nothing is shared with the main session's Redis or simulator (``tests/conftest.py``): the workers and
the producer get an environment built here, without the main session's ``TIERQ_*`` variables.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.chaos.harness import (
    SIM_TIME_SCALE,
    TIERS_TOML,
    ChaosSim,
    ChaosWorker,
    Producer,
    Tally,
    clean_env,
)
from tierq.ops.embedded import EmbeddedRedis
from tierq.sim import SimConfig
from tierq.store.keys import Keys

#: one row per scenario, printed as a table at the end of the run
ROWS: list[Tally] = []


class Chaos:
    """The chaos world of one test session."""

    def __init__(self, config: pytest.Config, tmp: Path) -> None:
        self.config = config
        self.tmp = tmp
        self.tag = uuid.uuid4().hex[:8]
        self.prefix = f"tierq-chaos-{self.tag}:"
        self.api_key = f"sk-ant-chaos-{uuid.uuid4().hex}"
        self.redis = EmbeddedRedis(appendonly=True).start()
        self.sim = ChaosSim(SimConfig(time_scale=SIM_TIME_SCALE, seed=11, stall_s=30.0)).start()
        tiers_file = tmp / "tiers.toml"
        tiers_file.write_text(TIERS_TOML, encoding="utf-8")
        self.env = clean_env(
            {
                "TIERQ_BROKER_URL": f"{self.redis.url}/0",
                "TIERQ_KEY_PREFIX": self.prefix,
                "TIERQ_TIERS_FILE": str(tiers_file),
                "TIERQ_LOG_FORMAT": "json",
                "ANTHROPIC_BASE_URL": self.sim.url,
                "ANTHROPIC_API_KEY": self.api_key,
            }
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=10)
        #: every worker started in the session (their logs are grepped at the end)
        self.workers: list[ChaosWorker] = []
        #: every document text and message secret the suite sent: none may reach a log
        self.secrets: list[str] = []
        self._numbers = itertools.count(1)

    def worker(self, tier: str, concurrency: int | None = None) -> ChaosWorker:
        """Start a worker subprocess for ``tier`` (not waiting for it to be ready)."""
        number = next(self._numbers)
        name = f"{tier}{number}"
        log = self.tmp / f"worker-{number:02d}-{tier}.log"
        proc = ChaosWorker(tier, name, self.env, log, concurrency)
        self.workers.append(proc)
        return proc

    def producer(self) -> Producer:
        return Producer(self.env, self.tmp / "producer.log")

    def key(self, name: str, job_id: str) -> str:
        """A tierq key of a job: ``result``, ``running``, ``starts``, ``tokens``..."""
        key: str = getattr(Keys(self.prefix), name)(job_id)
        return key

    def record(self, row: Tally) -> Tally:
        """Keep a scenario's counts for the final table and print its line now, even under capture."""
        ROWS.append(row)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.ensure_newline()
                reporter.write_line(row.line())
        return row

    def close(self) -> None:
        for proc in self.workers:
            if proc.alive():
                proc.kill()
        self.client.close()
        self.sim.stop()
        self.redis.stop()


@pytest.fixture(scope="session")
def chaos(pytestconfig: pytest.Config) -> Iterator[Chaos]:
    tmp = Path(tempfile.mkdtemp(prefix="tierq-chaos-"))
    world = Chaos(pytestconfig, tmp)
    try:
        yield world
    finally:
        world.close()
        if os.environ.get("TIERQ_CHAOS_KEEP_LOGS"):
            print(f"chaos logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh(chaos: Chaos) -> Iterator[None]:
    """Each scenario starts from a running, empty Redis and a simulator without fault rates."""
    if not chaos.redis.running:
        chaos.redis.restart()
    chaos.client.flushdb()
    chaos.sim.state.set_rates({})
    yield
    chaos.sim.state.set_rates({})


@pytest.fixture
def producer(chaos: Chaos) -> Iterator[Producer]:
    proc = chaos.producer()
    try:
        yield proc
    finally:
        proc.close()


class Pool:
    """The workers one scenario starts; stopped (SIGTERM, then SIGKILL) when it ends."""

    def __init__(self, chaos: Chaos) -> None:
        self.chaos = chaos
        self.started: list[ChaosWorker] = []

    def start(self, tier: str, concurrency: int | None = None) -> ChaosWorker:
        """Start a worker for ``tier`` (not waiting for it to be ready)."""
        proc = self.chaos.worker(tier, concurrency)
        self.started.append(proc)
        return proc

    def alive(self) -> list[ChaosWorker]:
        return [proc for proc in self.started if proc.alive()]

    def stop_all(self) -> None:
        for proc in self.started:
            proc.terminate()
        for proc in self.started:
            proc.stop(grace_s=5)


@pytest.fixture
def pool(chaos: Chaos) -> Iterator[Pool]:
    workers = Pool(chaos)
    try:
        yield workers
    finally:
        workers.stop_all()


def table_lines() -> list[str]:
    """The per-scenario table of this process's scenarios, with each scenario's notes below it."""
    columns = (
        "scenario",
        "submitted",
        "completed",
        "failed",
        "expired",
        "duplicates",
        "lost",
        "llm_calls",
        "rec_p50_s",
        "rec_p99_s",
    )
    width = max(len(row.scenario) for row in ROWS)
    lines = [f"{columns[0]:<{width}}" + "".join(f" {c:>10}" for c in columns[1:])]
    for row in ROWS:
        figures = (row.submitted, row.completed, row.failed, row.expired, row.duplicates, row.lost)
        recovery = [row.recovery(q) for q in (0.5, 0.99)]
        times = ["-" if r is None else f"{r:.2f}" for r in recovery]
        lines.append(
            f"{row.scenario:<{width}}" + "".join(f" {n:>10}" for n in (*figures, row.llm_calls, *times))
        )
    lines += [f"  {row.scenario}: {'; '.join(row.notes)}" for row in ROWS if row.notes]
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    terminalreporter.write_sep("=", "chaos: jobs per scenario")
    for line in table_lines():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    # under pytest-xdist the scenarios ran in a worker: its table goes to the controller, which
    # prints it (tests/conftest.py)
    output = getattr(session.config, "workeroutput", None)
    if output is not None and ROWS:
        output["chaos_table"] = table_lines()
