"""The core behaviours with RabbitMQ as the broker (quorum queues, publisher confirms), Redis for results.

Runs when ``TIERQ_TEST_AMQP_URL`` is set (``.ci/run`` sets it when RabbitMQ answers on 5672);
skipped otherwise. Queues are named per test run and deleted afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from simulator import SimServer
from tasks.errors import InvalidJobError, JobFailedError
from tasks.tiers import TierTable, load_tier_table
from tests.conftest import KEY_PREFIX, RUN_TAG, WorkerProcess
from tests.helpers import wait_until
from tierq import get_job, submit
from worker.celery.config import celery_config
from worker.core.settings import Settings

AMQP_URL = os.environ.get("TIERQ_TEST_AMQP_URL")
DOC = " ".join(
    f"Point {i}: quorum queues keep a job when a broker node or a worker goes away." for i in range(40)
)

pytestmark = pytest.mark.skipif(not AMQP_URL, reason="TIERQ_TEST_AMQP_URL is not set")


class Amqp:
    """A Celery app, tier table and worker environment for RabbitMQ, next to the session's Redis."""

    def __init__(self, tmp: Path) -> None:
        assert AMQP_URL
        self.tiers_file = tmp / "tiers-amqp.toml"
        self.tiers_file.write_text(
            "".join(
                f'[tiers.{name}]\nqueue = "tierq-test-{RUN_TAG}.{name}"\n'
                for name in ("fast", "standard", "slow")
            ),
            encoding="utf-8",
        )
        self.tiers: TierTable = load_tier_table(self.tiers_file)
        redis_url = os.environ["TIERQ_BROKER_URL"]
        settings = Settings(
            broker_url=AMQP_URL, result_backend=redis_url, key_prefix=KEY_PREFIX, tiers_file=self.tiers_file
        )
        self.app = Celery("tierq-amqp-tests")
        self.app.config_from_object(celery_config(settings, self.tiers))
        self.env = {
            **os.environ,
            "TIERQ_BROKER_URL": AMQP_URL,
            "TIERQ_RESULT_BACKEND": redis_url,
            "TIERQ_TIERS_FILE": str(self.tiers_file),
        }

    def worker(self, tier: str, tmp: Path, name: str) -> WorkerProcess:
        return WorkerProcess([tier], tmp / f"amqp-{name}.log", env=self.env)

    def wait_ready(self, procs: list[WorkerProcess], timeout: float = 60) -> None:
        nodes = {p.node for p in procs}

        def answered() -> bool:
            replies = self.app.control.ping(destination=list(nodes), timeout=0.5)
            return nodes <= {name for reply in replies for name in reply}

        def check() -> None:
            for proc in procs:
                proc.check()

        wait_until(answered, timeout, f"workers {nodes} to answer on RabbitMQ", check, interval=0)

    def depth(self, tier: str) -> int:
        with self.app.connection_for_write() as conn:
            declared = conn.default_channel.queue_declare(queue=self.tiers.tiers[tier].queue, passive=True)
            return int(declared.message_count)

    def delete_queues(self) -> None:
        with self.app.connection_for_write() as conn:
            for tier in self.tiers.tiers.values():
                conn.default_channel.queue_delete(tier.queue)

    def submit(self, text: str, urgency: str, **kwargs: Any) -> Any:
        return submit(text, urgency=urgency, app=self.app, tiers=self.tiers, **kwargs)


@pytest.fixture(scope="module")
def amqp(tmp_dir: Path) -> Iterator[Amqp]:
    setup = Amqp(tmp_dir)
    procs = [setup.worker(tier, tmp_dir, tier) for tier in ("fast", "standard", "slow")]
    try:
        setup.wait_ready(procs)
        yield setup
    finally:
        for proc in procs:
            proc.stop()
        setup.delete_queues()


@pytest.mark.parametrize(
    ("urgency", "tier", "model"),
    [
        ("critical", "fast", "claude-haiku-4-5"),
        ("normal", "standard", "claude-sonnet-5-5"),
        ("low", "slow", "claude-opus-5-5"),
    ],
)
def test_routing_over_rabbitmq(amqp: Amqp, urgency: str, tier: str, model: str) -> None:
    job = amqp.submit(DOC, urgency)
    result = job.result(timeout=30).to_json()
    assert (result["tier"], result["model"]) == (tier, model)
    # the worker runs a job only from its tier's queue: the tier in the result is the queue's
    assert result["timings"]["queue_wait_ms"] is not None and result["timings"]["ttft_ms"] > 0


def test_529_then_success_over_rabbitmq(amqp: Amqp, sim: SimServer) -> None:
    job_id = f"amqp-retry-{uuid.uuid4()}"
    sim.state.add_faults(["529"], job_id=job_id)
    result = amqp.submit(DOC, "high", job_id=job_id).result(timeout=30).to_json()
    assert result["retries"] == 1
    assert sim.state.request_count(job_id) == 2


def test_400_is_not_retried_over_rabbitmq(amqp: Amqp, sim: SimServer) -> None:
    job_id = f"amqp-bad-{uuid.uuid4()}"
    sim.state.add_faults(["400"], job_id=job_id)
    with pytest.raises(JobFailedError, match="RequestRejectedError"):
        amqp.submit(DOC, "high", job_id=job_id).result(timeout=30)
    assert sim.state.request_count(job_id) == 1


def test_bad_input_never_reaches_rabbitmq(amqp: Amqp) -> None:
    before = [amqp.depth(t) for t in amqp.tiers.tiers]
    for kwargs in ({"text": ""}, {"text": "ok", "urgency": "bogus"}):
        with pytest.raises(InvalidJobError):
            submit(**kwargs, app=amqp.app, tiers=amqp.tiers)  # type: ignore[arg-type]
    assert [amqp.depth(t) for t in amqp.tiers.tiers] == before


@pytest.mark.timeout(90)
def test_kill_9_mid_stream_over_rabbitmq(amqp: Amqp, sim: SimServer, tmp_dir: Path) -> None:
    """RabbitMQ requeues an unacked job the moment its worker's connection dies; the job completes once."""
    victim = amqp.worker("standard", tmp_dir, "victim")
    amqp.wait_ready([victim])
    job_id = f"amqp-kill-{uuid.uuid4()}"
    sim.state.add_faults(["stall:30"], job_id=job_id)  # the first call hangs mid-stream
    amqp.submit(DOC, "normal", job_id=job_id)
    wait_until(lambda: sim.state.request_count(job_id), 20, "the first model call")
    assert sim.state.request_count(job_id) == 1
    calls_before_kill = sim.state.request_count(job_id)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    result = get_job(job_id, app=amqp.app).result(timeout=60).to_json()
    assert result["job_id"] == job_id
    calls = sim.state.request_count(job_id)
    assert calls_before_kill == 1 and calls <= 2, f"the model was called {calls} times"
    victim.stop()
    survivor_logs = [
        line for line in (tmp_dir / "amqp-standard.log").read_text().splitlines() if job_id in line
    ]
    assert sum('"summarize.completed"' in line for line in survivor_logs) == 1
    sys.stdout.write(f"kill -9 over RabbitMQ: submitted 1, completed 1, llm calls {calls}, lost 0\n")


def test_rabbitmq_queues_are_quorum_queues(amqp: Amqp) -> None:
    queue = amqp.app.amqp.queues[amqp.tiers.tiers["fast"].queue]
    assert queue.queue_arguments == {"x-queue-type": "quorum"}
    assert amqp.app.conf.broker_transport_options["confirm_publish"] is True
