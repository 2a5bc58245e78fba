"""Workers that die: kill -9 mid-stream, kill -9 between the answer and the ack, SIGTERM mid-job."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.chaos.conftest import Chaos, Pool
from tests.chaos.harness import (
    LONG_TOKENS,
    ChaosWorker,
    Producer,
    document,
    new_id,
    new_tag,
    tally,
    unacked_ids,
)
from tests.helpers import wait_until
from tierq.store.streams import StreamEntry, read_entries

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow


def _completed_lines(workers: list[ChaosWorker], job_id: str) -> int:
    return sum(len(w.events_for(job_id, "summarize.completed")) for w in workers)


def _long_job(chaos: Chaos, producer: Producer, stream: bool = False) -> str:
    tag = new_tag()
    text = document(tag, 320)
    chaos.secrets += [tag, text[:200]]
    submitted = producer.submit(text, "low", max_tokens=LONG_TOKENS, stream=stream)
    assert submitted["ok"], submitted
    return str(submitted["job_id"])


@pytest.mark.timeout(150)
def test_kill_9_mid_stream_redelivers_and_completes_once(
    chaos: Chaos, pool: Pool, producer: Producer
) -> None:
    first = pool.start("slow").wait_ready()
    # the slow pool has 2 threads: both run; the first streams its text to a reader here
    ids = [_long_job(chaos, producer, stream=True), _long_job(chaos, producer)]
    live: list[StreamEntry | None] = []
    tokens_key = chaos.key("tokens", ids[0])
    reader = threading.Thread(
        target=lambda: live.extend(read_entries(chaos.client, tokens_key, time.monotonic() + 120)),
        daemon=True,
    )
    reader.start()
    wait_until(
        lambda: all(chaos.sim.counter.streamed_text(j) for j in ids), 30, "both streams to produce text"
    )
    killed_at = time.time()
    first.kill()
    assert all(chaos.sim.counter.completed(j) == 0 for j in ids), "the kill must land mid-stream"
    second = pool.start("slow")

    producer.wait_ended(ids, timeout=90)
    outcomes = producer.outcomes(ids)
    counter = chaos.sim.counter
    row = tally(
        "1 kill -9 mid-stream",
        outcomes,
        counter,
        [
            f"requests per job {[counter.requests(j) for j in ids]}",
            "recovery includes the new worker's start",
        ],
    )
    later = [[t for t in counter.arrivals(j) if t > killed_at] for j in ids]
    row.recovery_s = [min(times) - killed_at for times in later if times]
    chaos.record(row)
    assert (row.completed, row.lost, row.duplicates) == (len(ids), 0, 0), outcomes
    for job_id in ids:
        assert counter.requests(job_id) <= 2, "the LLM is called at most twice for a job killed mid-stream"
        assert counter.completed(job_id) == 1
        assert second.events_for(job_id, "summarize.completed"), (
            "the redelivered message ran on the new worker"
        )
        assert _completed_lines(pool.started, job_id) == 1, "its result is recorded once"
        assert chaos.client.exists(chaos.key("result", job_id))

    # the streamed job: the live reader was told it restarted, then got the finished run's whole text
    summary = json.loads(chaos.client.get(chaos.key("result", ids[0])))["summary"]  # type: ignore[arg-type]
    reader.join(timeout=10)
    entries = [e for e in live if e is not None]
    assert entries[-1].end == "succeeded"
    restarts = [i for i, e in enumerate(entries) if e.restarted]
    assert restarts, "the reader saw text of the killed run, then a restart"
    assert "".join(e.text or "" for e in entries[restarts[-1] :]) == summary
    # a reader that comes after the end gets only the finished run's text
    late = list(read_entries(chaos.client, tokens_key, time.monotonic() + 10))
    assert not any(e is not None and e.restarted for e in late)
    assert "".join(e.text or "" for e in late if e is not None) == summary
    runs = {e[1][b"a"] for e in chaos.client.xrange(tokens_key) if b"a" in e[1]}
    assert len(runs) == 2, "the stream holds both runs' text"


def _kill_after_the_answer(chaos: Chaos, producer: Producer, victim: ChaosWorker) -> tuple[str, bool]:
    """Run one job on ``victim`` and SIGKILL it as the result is recorded; the job id and whether the
    message was still unacknowledged (the kill won the race against the ack)."""
    tag = new_tag()
    text = document(tag, 520)  # ~45,000 characters: Celery takes a moment to store the result and ack
    chaos.secrets += [tag, text[:200]]
    job_id = new_id("acked")
    # be told the moment the worker records the result, then stop it at once (SIGSTOP) and kill it
    chaos.client.config_set("notify-keyspace-events", "K$")
    watcher = chaos.client.pubsub()
    watcher.subscribe(f"__keyspace@0__:{chaos.key('result', job_id)}")
    try:
        submitted = producer.submit(text, "critical", job_id=job_id)
        assert submitted["ok"], submitted

        def recorded() -> bool:
            message = watcher.get_message(ignore_subscribe_messages=True, timeout=0.5)
            return message is not None and message["data"] == b"set"

        wait_until(recorded, 30, "the worker to record the result", interval=0)
        os.kill(victim.pid, signal.SIGSTOP)
        victim.kill()
    finally:
        watcher.close()
        chaos.client.config_set("notify-keyspace-events", "")
    assert chaos.sim.counter.completed(job_id) == 1
    return job_id, job_id in unacked_ids(chaos.client, chaos.prefix)


@pytest.mark.timeout(120)
def test_kill_9_after_the_answer_before_the_ack_calls_the_model_once(
    chaos: Chaos, pool: Pool, producer: Producer
) -> None:
    killed: dict[str, bool] = {}  # job id → killed before the ack
    for _ in range(2):  # a second try if the ack won the race
        job_id, before_ack = _kill_after_the_answer(chaos, producer, pool.start("fast").wait_ready())
        killed[job_id] = before_ack
        if before_ack:
            break
    redelivered = [j for j, before_ack in killed.items() if before_ack]
    if redelivered:  # a new worker gets the message after the visibility timeout
        second = pool.start("fast")
        wait_until(
            lambda: all(second.events_for(j, "summarize.deduplicated") for j in redelivered),
            60,
            "the redelivery",
        )
    producer.wait_ended(killed, timeout=30)
    outcomes = producer.outcomes(killed)
    counter = chaos.sim.counter
    notes = ["killed before the ack, redelivered" if b else "the ack won the race" for b in killed.values()]
    row = chaos.record(tally("2 kill -9 after answer, before ack", outcomes, counter, notes))
    assert (row.completed, row.lost, row.duplicates) == (len(killed), 0, 0), outcomes
    for job_id in killed:
        assert counter.requests(job_id) == 1, "no second LLM call for a job whose result was recorded"
        assert _completed_lines(pool.started, job_id) == 1
    for job_id in redelivered:
        [line] = second.events_for(job_id, "summarize.deduplicated")
        assert line["reason"] == "result already recorded"


@pytest.mark.timeout(150)
def test_sigterm_mid_job_finishes_running_jobs_and_leaves_the_rest_queued(
    chaos: Chaos, pool: Pool, producer: Producer
) -> None:
    first = pool.start("slow").wait_ready()
    ids = [_long_job(chaos, producer) for _ in range(4)]  # 2 threads: 2 run, 2 wait in the queue
    wait_until(
        lambda: sum(1 for j in ids if chaos.sim.counter.streamed_text(j)) >= 2, 30, "two jobs mid-stream"
    )
    running = [j for j in ids if chaos.sim.counter.streamed_text(j)]
    first.terminate()
    exit_code = first.wait_exit(timeout=60)
    finished_by_first = [j for j in ids if first.events_for(j, "summarize.completed")]
    requeued = [j for j in ids if j not in finished_by_first]
    second = pool.start("slow")

    producer.wait_ended(ids, timeout=90)
    outcomes = producer.outcomes(ids)
    counter = chaos.sim.counter
    row = chaos.record(
        tally(
            "3 SIGTERM mid-job",
            outcomes,
            counter,
            [f"{len(finished_by_first)} finished in warm shutdown, {len(requeued)} left for the next worker"],
        )
    )
    assert exit_code == 0, first.text()[-2000:]
    assert set(running) <= set(finished_by_first), "warm shutdown lets running jobs finish"
    assert (row.completed, row.lost, row.duplicates) == (len(ids), 0, 0), outcomes
    for job_id in ids:
        assert counter.requests(job_id) == 1 and counter.completed(job_id) == 1
        assert _completed_lines(pool.started, job_id) == 1
    assert all(second.events_for(j, "summarize.completed") for j in requeued)
