"""The core behaviours with RabbitMQ as the broker (quorum queues, publisher confirms), Redis for results.

Runs when ``TIERQ_TEST_AMQP_URL`` is set (``.ci/run`` sets it when RabbitMQ answers on 5672);
skipped otherwise. Queues are named per test run and deleted afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from tests.conftest import KEY_PREFIX, RUN_TAG, WorkerProcess
from tests.helpers import wait_until
from tierq import get_job, submit
from tierq.celery.config import celery_config, delivery_limit_queue
from tierq.contract.errors import InvalidJobError, JobFailedError
from tierq.contract.message import DELIVERY_LIMIT_QUEUE
from tierq.contract.tiers import TierTable, load_tier_table
from tierq.core.settings import MAX_CRASHES, Settings
from tierq.sim import SimServer

AMQP_URL = os.environ.get("TIERQ_TEST_AMQP_URL")
SERVED = ("fast", "standard", "slow")
DOC = " ".join(
    f"Point {i}: quorum queues keep a job when a broker node or a worker goes away." for i in range(40)
)

pytestmark = [pytest.mark.skipif(not AMQP_URL, reason="TIERQ_TEST_AMQP_URL is not set"), pytest.mark.slow]


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
        return WorkerProcess([tier], tmp / f"amqp-{name}.log", env=self.env, name=f"amqp-{name}")

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
    procs = [setup.worker(tier, tmp_dir, tier) for tier in SERVED]
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
    # the queues of the tiers served here (a queue nobody consumes is never declared on RabbitMQ)
    before = [amqp.depth(t) for t in SERVED]
    for kwargs in ({"text": ""}, {"text": "ok", "urgency": "bogus"}):
        with pytest.raises(InvalidJobError):
            submit(**kwargs, app=amqp.app, tiers=amqp.tiers)  # type: ignore[arg-type]
    assert [amqp.depth(t) for t in SERVED] == before


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


@pytest.mark.timeout(120)
def test_kill_9_of_a_fast_worker_over_rabbitmq_recovers_within_seconds(
    amqp: Amqp, sim: SimServer, tmp_dir: Path
) -> None:
    """The module's fast worker survives; the victim's jobs run again on it as soon as RabbitMQ sees the
    victim's connection close (no timer)."""
    victim = amqp.worker("fast", tmp_dir, "fast-victim")
    amqp.wait_ready([victim])
    # consuming (Celery's "ready." follows the task consumer's start; a ping answers before it)
    wait_until(lambda: " ready." in victim.log_path.read_text(errors="replace"), 30, "the victim consuming")
    ids = [f"amqp-fast-kill-{uuid.uuid4().hex[:12]}" for _ in range(16)]
    for job_id in ids:
        sim.state.add_faults(["stall:6"], job_id=job_id)  # every first call hangs mid-stream for 6 s
        amqp.submit(DOC, "critical", job_id=job_id)
    wait_until(lambda: all(sim.state.request_count(j) for j in ids), 30, "every first call")
    killed_at = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    results = [get_job(j, app=amqp.app).result(timeout=60) for j in ids]
    assert [r.job_id for r in results] == ids
    moved = [j for j in ids if sim.state.request_count(j) == 2]
    assert moved, "the victim held some of the jobs"
    assert all(sim.state.request_count(j) <= 2 for j in ids)
    recovery = sorted(
        min(t["arrived_at"] for t in sim.state.timings(j) if (t["arrived_at"] or 0) > killed_at) - killed_at
        for j in moved
    )
    victim.stop()
    sys.stdout.write(
        f"kill -9 of a fast worker over RabbitMQ: {len(moved)} of {len(ids)} jobs moved, recovery "
        f"p50 {recovery[len(recovery) // 2]:.3f} s, max {recovery[-1]:.3f} s, lost 0\n"
    )
    assert recovery[-1] <= 5.0, recovery


def _get(queue: Any, timeout: float) -> Any:
    """One message from ``queue`` (unacknowledged), or None after ``timeout`` seconds."""
    try:
        return wait_until(lambda: queue.get(no_ack=False), timeout, "a message", interval=0.05)
    except AssertionError:
        return None


def test_a_message_past_its_delivery_limit_is_dead_lettered(amqp: Amqp) -> None:
    """A message returned to a tier's queue more often than its limit (a worker that keeps crashing
    before tierq's own start count) is dead-lettered by RabbitMQ, not dropped."""
    fast = amqp.app.amqp.queues[amqp.tiers.tiers["fast"].queue]
    limit = int(fast.queue_arguments["x-delivery-limit"])
    # a queue of the fast tier's arguments that no worker consumes
    probe = Queue(f"{fast.name}.probe", fast.exchange, routing_key=f"{fast.name}.probe", durable=True)
    probe.queue_arguments = dict(fast.queue_arguments)
    marker = f"limit-{uuid.uuid4().hex}"
    with amqp.app.connection_for_write() as conn:
        channel = conn.default_channel
        bound = probe(channel)
        bound.declare()
        try:
            with conn.Producer(channel) as producer:
                producer.publish({"marker": marker}, exchange=fast.exchange, routing_key=probe.routing_key,
                                 declare=[bound], serializer="json")  # fmt: skip
            returns = 0
            while returns <= limit + 1:
                message = _get(bound, 3.0)
                if message is None:  # dead-lettered
                    break
                if message.payload != {"marker": marker}:
                    message.ack()
                    continue
                message.reject(requeue=True)
                returns += 1
            assert limit <= returns <= limit + 1, f"returned {returns} times; the limit is {limit}"
            dead = delivery_limit_queue()(channel)

            def dead_lettered() -> bool:
                got = dead.get(no_ack=False)
                if got is None:
                    return False
                mine = got.payload == {"marker": marker}
                got.ack() if mine else got.reject(requeue=True)
                return mine

            wait_until(dead_lettered, 10, "the message in the delivery-limit queue", interval=0.05)
            assert bound.get(no_ack=True) is None, "it left the tier's queue"
        finally:
            bound.delete()


def test_rabbitmq_queues_are_quorum_queues(amqp: Amqp) -> None:
    queue = amqp.app.amqp.queues[amqp.tiers.tiers["fast"].queue]
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": amqp.tiers.tiers["fast"].max_retries + 1 + MAX_CRASHES + 1,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": DELIVERY_LIMIT_QUEUE,
    }
    slowest_ms = int(amqp.tiers.slowest_deadline_s * 1000)
    assert queue.consumer_arguments is not None
    assert queue.consumer_arguments["x-consumer-timeout"] > slowest_ms
    assert amqp.app.conf.broker_transport_options["confirm_publish"] is True
