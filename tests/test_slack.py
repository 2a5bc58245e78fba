"""Slack routing: a tier that sends a job through Message Batches only when its deadline can wait.

A deployment of its own (a key prefix, a tiers file giving the standard tier
``batch_when_slack_s = 120``) and one real standard worker, against the session's simulator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tasks.tiers import BatchPolicy, Tier, load_tier_table
from tests.conftest import KEY_PREFIX, WorkerProcess, wait_for_nodes
from tierq import Producer, submit
from worker.celery.app import make_app
from worker.core.settings import Settings
from worker.llm.pricing import cost_usd

PREFIX = f"{KEY_PREFIX}slack-"
TIERS = """
[tiers.standard]
batch_when_slack_s = 120
"""
DOC = " ".join(f"Sentence {i} of a document whose deadline decides its path." for i in range(20))


@dataclass
class Deployment:
    producer: Producer
    worker: WorkerProcess


@pytest.fixture(scope="module")
def deployment(tmp_dir: Path, redis_url: str) -> Iterator[Deployment]:
    tiers_file = tmp_dir / "tiers-slack.toml"
    tiers_file.write_text(TIERS, encoding="utf-8")
    env = {"TIERQ_KEY_PREFIX": PREFIX, "TIERQ_TIERS_FILE": str(tiers_file)}
    settings = Settings(key_prefix=PREFIX, tiers_file=tiers_file)
    tiers = load_tier_table(tiers_file)
    worker = WorkerProcess(["standard"], tmp_dir / "worker-slack.log", env, name="slack-standard")
    client = redis.Redis.from_url(redis_url)
    try:
        app = make_app(settings, tiers)
        wait_for_nodes([worker.node], [worker], app=app)
        yield Deployment(Producer(settings, tiers, app), worker)
    finally:
        worker.stop()
        keys = list(client.scan_iter(match=f"{PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_a_job_with_slack_goes_through_a_batch_and_a_pressing_one_does_not(deployment: Deployment) -> None:
    pressing = submit(DOC, urgency="normal", deadline_s=60, producer=deployment.producer)
    relaxed = submit(DOC, urgency="normal", producer=deployment.producer)  # the tier's 300 s
    fast = pressing.result(timeout=30)
    assert fast.tier == "standard" and fast.path == "messages" and fast.batch_id is None
    assert fast.timings.batch_wait_ms is None and fast.timings.ttft_ms is not None
    assert fast.cost_usd == cost_usd(fast.model, fast.usage)
    slow = relaxed.result(timeout=90)
    assert slow.tier == "standard" and slow.path == "batch" and slow.batch_id
    assert slow.timings.batch_wait_ms is not None and slow.timings.batch_wait_ms > 0
    assert slow.cost_usd == cost_usd(slow.model, slow.usage, batch=True)
    lines = {
        job.id: deployment.worker.wait_for(job.id, "summarize.completed")[0] for job in (pressing, relaxed)
    }
    assert lines[pressing.id]["path"] == "messages" and lines[relaxed.id]["path"] == "batch"
    assert deployment.worker.events_for(relaxed.id, "summarize.parked")


def test_batch_when_slack_s_gives_the_tier_a_batch_policy_and_decides_by_slack() -> None:
    tier = Tier(
        name="t", queue="q", model="claude-sonnet-5-5", max_tokens=64, deadline_s=600, batch_when_slack_s=120
    )
    assert tier.batch == BatchPolicy()
    assert tier.takes_batch(121) and not tier.takes_batch(120) and not tier.takes_batch(5)
    always = tier.model_copy(update={"batch_when_slack_s": None})
    assert always.takes_batch(0)
    never = tier.model_copy(update={"batch": None, "batch_when_slack_s": None})
    assert not never.takes_batch(86_400)
    with pytest.raises(ValueError, match="batch_when_slack_s"):
        Tier(name="t", queue="q", model="m", max_tokens=64, deadline_s=600, batch_when_slack_s=0)
