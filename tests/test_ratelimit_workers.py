"""The shared rate limit with several real worker processes against a simulator whose limits are low.

A deployment of its own (a key prefix, a simulator at 120 requests a minute per model, a tiers file
that puts the slow tier on the fast tier's model) so that its buckets and queues meet nobody
else's: a fast worker, a slow worker and two standard workers, configured with the limits the
deployment knows (``TIERQ_RATE_LIMITS``), as an operator would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import KEY_PREFIX, WorkerProcess, own_deployment
from tests.helpers import wait_until
from tierq import Producer, submit
from tierq.contract.errors import DeadlineUnmeetableError
from tierq.contract.tiers import load_tier_table
from tierq.observe.metrics import queue_list_keys
from tierq.producer import Job
from tierq.sim import SimConfig, SimServer
from tierq.sim.ratelimit import Limits
from tierq.store.ratelimit import LimiterStats

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

PREFIX = f"{KEY_PREFIX}rl-"
#: the simulator's limits per model, and the same as the deployment configures them
SIM_LIMITS = "rpm=120,itpm=10000000,otpm=10000000"
RATE_LIMITS = "requests=120,input_tokens=10000000,output_tokens=10000000"
TIERS = """
[tiers.slow]
model = "claude-haiku-4-5"
effort = ""
max_tokens = 256
concurrency = 16

[tiers.standard]
concurrency = 16
"""
#: the worker processes: (name, tier)
POOLS = (("fast", "fast"), ("slow", "slow"), ("standard-1", "standard"), ("standard-2", "standard"))
DOC = " ".join(f"Sentence {i} of a document that waits its turn for the rate limit." for i in range(20))


@dataclass
class Deployment:
    sim: SimServer
    producer: Producer
    app: Celery
    stats: LimiterStats
    workers: dict[str, WorkerProcess]


@pytest.fixture(scope="module")
def deployment(tmp_dir: Path, redis_url: str) -> Iterator[Deployment]:
    sim = SimServer(SimConfig(time_scale=0.02, seed=11, limits=Limits.parse(SIM_LIMITS)))
    sim.start()
    env = {"TIERQ_RATE_LIMITS": RATE_LIMITS, "ANTHROPIC_BASE_URL": sim.url}
    pools = {name: [tier] for name, tier in POOLS}
    try:
        with own_deployment("rl", tmp_dir, redis_url, TIERS, pools, env) as own:
            yield Deployment(sim, own.producer, own.app, LimiterStats(own.redis, own.prefix), own.workers)
    finally:
        sim.stop()


def _submit(deployment: Deployment, urgency: str, producer_id: str) -> Job:
    return submit(DOC, urgency=urgency, producer_id=producer_id, producer=deployment.producer)


def test_a_slow_burst_meets_no_429_storm_and_the_fast_tier_goes_first(deployment: Deployment) -> None:
    """300 slow jobs (2.5 minutes of the limit) burst onto the fast tier's model; fast jobs come in
    meanwhile. The slow tier may not take the quarter of the limit the fast tier keeps, so every
    fast job runs without waiting for the limit, and no call meets a 429."""
    model = "claude-haiku-4-5"
    slow = [_submit(deployment, "low", "burst") for _ in range(300)]
    wait_until(lambda: _admitted(deployment, model) >= 60, 30, "the burst to use the limit")
    fast = []
    for _ in range(10):
        fast.append(_submit(deployment, "critical", "steady"))
        fast[-1].result(timeout=30)
    results = [job.result(timeout=30) for job in fast]
    counts = deployment.sim.state.limit_counts()["models"][model]
    waits = sorted(r.timings.limiter_wait_ms for r in results)
    print(f"\nslow burst: {counts}; fast limiter waits (ms): {waits}")
    assert counts["rate_limited"] == 0, f"the API answered 429 {counts['rate_limited']} times"
    assert waits[-1] < 500, f"fast jobs waited for the limit: {waits}"
    done_slow = sum(job.ready() for job in slow)
    assert done_slow < 300, "the burst was larger than the limit let through"
    stats = deployment.stats.read(5)
    assert stats.get("calls:slow", 0) >= 60 and stats.get("429:slow", 0) == 0
    assert stats.get("waits:slow", 0) > 0, "slow jobs went back to their queue to wait"
    _drop_queue(deployment, "tierq.slow")


def _admitted(deployment: Deployment, model: str) -> int:
    """Calls of ``model`` the simulator's rate limit let through so far."""
    return int(deployment.sim.state.limit_counts()["models"].get(model, {}).get("admitted", 0))


def _drop_queue(deployment: Deployment, queue: str) -> None:
    """Drop what is still queued (the rest of a burst): the next test meets a quiet deployment."""
    deployment.stats.client.delete(*queue_list_keys(queue, PREFIX))


def test_two_producers_share_a_contended_tier_fairly(deployment: Deployment) -> None:
    """A producer bursts 200 standard jobs; another then sends 10. The second's jobs sit behind the
    burst in the queue, yet while both wait for the limit each gets half of what it lets through."""
    model = load_tier_table(None).tiers["standard"].model
    burst = [_submit(deployment, "normal", "burst") for _ in range(200)]

    def used() -> int:
        return _admitted(deployment, model)

    wait_until(lambda: used() >= 110, 30, "the burst to use the bucket")
    # admission: the burst's own next job would wait behind its appointments, past a 10 s deadline
    admission = deployment.producer.admission
    assert admission is not None
    tier = deployment.producer.tiers.tiers["standard"]

    def burst_refused() -> DeadlineUnmeetableError | None:
        admission.refresh()
        try:
            admission.check(tier, len(DOC), tier.max_tokens, 10.0, "burst")
        except DeadlineUnmeetableError as exc:
            return exc
        return None

    refused = wait_until(burst_refused, 15, "the burst's appointments to run past 10 s")
    assert "could not start this job before its deadline" in str(refused) and refused.retry_after
    assert admission.check(tier, len(DOC), tier.max_tokens, 60.0, "steady").start_s < 60
    # counted from here: the burst's calls while admission was read are not the steady producer's wait
    started = used()
    steady = [_submit(deployment, "normal", "steady") for _ in range(10)]
    results = [job.result(timeout=60) for job in steady]
    during = used() - started
    assert all(r.summary for r in results)
    share = len(steady) / during
    print(f"\nfair share: steady got {len(steady)} of the {during} calls made while it waited ({share:.0%})")
    assert share >= 0.8 * 0.5, f"steady got {len(steady)} of the {during} calls made while it waited"
    assert sum(job.ready() for job in burst) < 200
    _drop_queue(deployment, "tierq.standard")
