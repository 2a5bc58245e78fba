"""Recovery on the shipped defaults: a killed worker's jobs run again on a live worker of the same tier
within seconds (their leases lapse), while live workers' jobs, however long, are never redelivered.

Each interrupted job's recovery time is measured from the kill to its next request at the simulator.
Every first call below stalls (the simulator sends the stream's first events, then nothing) so that
the jobs are surely in flight when the kill lands; their second call is a normal one.
"""

from __future__ import annotations

import time

import pytest

from tests.chaos.conftest import Chaos, Pool
from tests.chaos.harness import (
    ChaosWorker,
    MemoryCgroup,
    Producer,
    Tally,
    document,
    new_id,
    new_tag,
    tally,
    unacked_ids,
    whereabouts,
)
from tests.helpers import wait_until

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

#: the fast tier's recovery target (issue 12): p99 seconds from kill -9 to running again
FAST_RECOVERY_P99_S = 5.0
#: seconds each first call stalls: far longer than any recovery, shorter than the fast deadline
STALL_S = 12


def _stalled_job(chaos: Chaos, producer: Producer, urgency: str, kind: str, stall_s: float = STALL_S) -> str:
    """Submit a job whose first LLM call stalls ``stall_s`` seconds mid-stream."""
    tag = new_tag()
    text = document(tag, 40)
    chaos.secrets += [tag, text[:200]]
    job_id = new_id(kind)
    chaos.sim.state.add_faults([f"stall:{stall_s}"], job_id=job_id)
    submitted = producer.submit(text, urgency, job_id=job_id)
    assert submitted["ok"], submitted
    return job_id


def _in_flight(chaos: Chaos, ids: list[str], timeout: float = 60) -> None:
    counter = chaos.sim.counter
    wait_until(lambda: all(counter.requests(j) >= 1 for j in ids), timeout, f"{len(ids)} calls in flight")


def _recovery(chaos: Chaos, ids: list[str], killed_at: float) -> list[float]:
    """Seconds from the kill to each job's first request after it."""
    out = []
    for job_id in ids:
        after = [t for t in chaos.sim.counter.arrivals(job_id) if t > killed_at]
        if after:
            out.append(round(after[0] - killed_at, 3))
    return out


def _record(
    chaos: Chaos, producer: Producer, name: str, ids: list[str], recovery: list[float], notes: list[str]
) -> Tally:
    row = tally(name, producer.outcomes(ids), chaos.sim.counter, notes)
    row.recovery_s = recovery
    return chaos.record(row)


def _ran_on(workers: list[ChaosWorker], job_id: str) -> list[str]:
    return [w.node for w in workers if w.events_for(job_id, "summarize.completed")]


@pytest.mark.timeout(240)
def test_kill_9_of_a_fast_worker_with_32_in_flight_recovers_within_seconds(
    chaos: Chaos, pool: Pool, producer: Producer
) -> None:
    slow = pool.start("slow")
    victim = pool.start("fast", concurrency=32)
    slow.wait_ready()
    victim.wait_ready()
    # the slow tier runs long jobs the whole time: live, so never redelivered, however long
    slow_ids = [_stalled_job(chaos, producer, "low", "long", stall_s=3 * STALL_S) for _ in range(2)]
    fast_ids = [_stalled_job(chaos, producer, "critical", "fast") for _ in range(32)]
    _in_flight(chaos, slow_ids + fast_ids)
    survivor = pool.start("fast", concurrency=32).wait_ready()
    assert all(chaos.sim.counter.requests(j) == 1 for j in fast_ids), "the survivor took nothing yet"

    killed_at = time.time()
    victim.kill()
    producer.wait_ended(fast_ids + slow_ids, timeout=120)
    recovery = _recovery(chaos, fast_ids, killed_at)
    row = _record(
        chaos,
        producer,
        "9 kill -9 fast, 32 in flight",
        fast_ids + slow_ids,
        recovery,
        [f"slow jobs' LLM calls {[chaos.sim.counter.requests(j) for j in slow_ids]}"],
    )
    assert (row.completed, row.lost, row.duplicates) == (len(fast_ids) + len(slow_ids), 0, 0), row.line()
    assert len(recovery) == len(fast_ids), "every interrupted fast job ran again"
    p99 = row.recovery(0.99)
    assert p99 is not None and p99 <= FAST_RECOVERY_P99_S, row.line()
    for job_id in fast_ids:
        assert _ran_on(pool.started, job_id) == [survivor.node]
        assert chaos.sim.counter.requests(job_id) == 2
    for job_id in slow_ids:
        assert chaos.sim.counter.requests(job_id) == 1, "a live worker's long job is never redelivered"
        assert _ran_on(pool.started, job_id) == [slow.node]
    assert not unacked_ids(chaos.client, chaos.prefix), "nothing is left unacknowledged"


@pytest.mark.timeout(240)
def test_a_lost_node_every_pool_killed_at_once_then_restarted(
    chaos: Chaos, pool: Pool, producer: Producer
) -> None:
    fast, slow = pool.start("fast", concurrency=8), pool.start("slow")
    fast.wait_ready()
    slow.wait_ready()
    fast_ids = [_stalled_job(chaos, producer, "critical", "node-fast") for _ in range(8)]
    slow_ids = [_stalled_job(chaos, producer, "low", "node-slow") for _ in range(2)]
    _in_flight(chaos, fast_ids + slow_ids)

    killed_at = time.time()
    for worker in (fast, slow):
        worker.kill()
    restarted = [pool.start("fast", concurrency=8), pool.start("slow")]
    producer.wait_ended(fast_ids + slow_ids, timeout=120)
    recovery = _recovery(chaos, fast_ids + slow_ids, killed_at)
    row = _record(
        chaos,
        producer,
        "10 lost node: every pool killed, restarted",
        fast_ids + slow_ids,
        recovery,
        ["recovery includes the new workers' start-up"],
    )
    assert (row.completed, row.lost, row.duplicates) == (len(fast_ids) + len(slow_ids), 0, 0), row.line()
    assert len(recovery) == len(fast_ids) + len(slow_ids)
    for job_id in fast_ids + slow_ids:
        assert chaos.sim.counter.requests(job_id) == 2
        assert _ran_on(pool.started, job_id) in ([restarted[0].node], [restarted[1].node])
    assert not unacked_ids(chaos.client, chaos.prefix)


#: bytes a worker may allocate once moved into its cgroup: well under what 32 fast jobs of 50,000
#: characters take in flight (~17 MB measured), well over an idle worker's needs
MEMORY_LIMIT_BYTES = 8 * 1024 * 1024
#: the fast tier's largest text
FAST_TEXT_CHARS = 50_000


@pytest.mark.timeout(240)
def test_a_worker_killed_for_memory(chaos: Chaos, pool: Pool, producer: Producer) -> None:
    cgroup = MemoryCgroup.create(f"tierq-chaos-{chaos.tag}")
    if cgroup is None:
        pytest.skip("no memory cgroup can be made here (needs root and a writable cgroupfs)")
    try:
        survivor = pool.start("fast", concurrency=32)
        victim = pool.start("fast", concurrency=32)
        survivor.wait_ready()
        victim.wait_ready()
        cgroup.limit(MEMORY_LIMIT_BYTES)
        cgroup.add(victim.pid)
        ids = []
        for _ in range(32):
            tag = new_tag()
            text = document(tag, 600)[:FAST_TEXT_CHARS]
            chaos.secrets += [tag, text[:200]]
            job_id = new_id("memory")
            chaos.sim.state.add_faults(["stall:6"], job_id=job_id)
            assert producer.submit(text, "critical", job_id=job_id)["ok"]
            ids.append(job_id)
        wait_until(lambda: not victim.alive(), 60, "the kernel to kill the worker for memory", interval=0.02)
        killed_at = time.time()
        producer.wait_ended(ids, timeout=120)
        assert victim.proc.returncode == -9 and cgroup.oom_kills() >= 1, "killed by the kernel's OOM killer"
        interrupted = [j for j in ids if chaos.sim.counter.requests(j) > 1]
        recovery = _recovery(chaos, interrupted, killed_at)
        row = _record(
            chaos,
            producer,
            "11 fast worker OOM-killed",
            ids,
            recovery,
            [f"{len(interrupted)} jobs in flight on the killed worker; its death seen within 20 ms"],
        )
        stuck = {
            j: whereabouts(chaos.client, chaos.prefix, j) for j in ids if chaos.sim.counter.requests(j) == 0
        }
        assert (row.completed, row.lost, row.duplicates) == (len(ids), 0, 0), f"{row.line()} {stuck}"
        assert interrupted, "the killed worker held jobs"
        p99 = row.recovery(0.99)
        assert p99 is not None and p99 <= FAST_RECOVERY_P99_S, row.line()
        assert all(_ran_on(pool.started, j) == [survivor.node] for j in interrupted)
        assert not unacked_ids(chaos.client, chaos.prefix)
    finally:
        for worker in pool.started:
            worker.kill()
        cgroup.remove()
