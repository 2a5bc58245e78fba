"""Last: no document text, message body or API key in the log lines the chaos workers wrote."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.chaos.conftest import Chaos, Pool
from tests.chaos.harness import ChaosWorker, Producer, document, new_id, new_tag, tally
from tests.helpers import wait_until

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow


def _needles(chaos: Chaos) -> dict[str, str]:
    return {s: "document or message text" for s in chaos.secrets} | {chaos.api_key: "API key"}


def _without_locals(line: str) -> tuple[str, str]:
    """A JSON line without the frame locals of its traceback, and those locals as JSON (tierq logs no
    locals: a hit there is still a hit); any other line as it is."""
    if not line.startswith("{"):
        return line, ""
    try:
        event: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        return line, ""
    dropped = []
    for exc in event.get("exception") or []:
        for frame in exc.get("frames") or []:
            if "locals" in frame:
                dropped.append(frame.pop("locals"))
    return json.dumps(event), json.dumps(dropped) if dropped else ""


def _grep(workers: list[ChaosWorker], needles: dict[str, str]) -> tuple[int, list[str], list[str]]:
    """Lines read, hits outside traceback locals, hits inside them (``file:line: what``)."""
    lines, outside, inside = 0, [], []
    for worker in workers:
        for number, line in enumerate(worker.text().splitlines(), 1):
            lines += 1
            rest, local_vars = _without_locals(line)
            for needle, what in needles.items():
                if needle in rest:
                    outside.append(f"{worker.log_path.name}:{number}: {what}")
                if needle in local_vars:
                    inside.append(f"{worker.log_path.name}:{number}: {what} in traceback locals")
    return lines, outside, inside


@pytest.mark.timeout(90)
def test_failed_jobs_log_no_document_text(chaos: Chaos, pool: Pool, producer: Producer) -> None:
    worker = pool.start("fast").wait_ready()
    ids = {"rejected": new_id("rejected"), "garbled": new_id("garbled")}
    chaos.sim.state.add_faults(["400"], job_id=ids["rejected"])
    chaos.sim.counter.garble(ids["garbled"])
    tags = {}
    for kind, job_id in ids.items():
        tags[kind] = tag = new_tag()
        text = document(tag, 40)
        chaos.secrets += [tag, text[:200]]
        submitted = producer.submit(text, "critical", job_id=job_id)
        assert submitted["ok"], submitted
    producer.wait_ended(ids.values(), timeout=30)
    outcomes = producer.outcomes(ids.values())
    wait_until(
        lambda: all(worker.events_for(j, "summarize.failed") for j in ids.values()), 10, "the failure lines"
    )
    # tierq's errors are Celery's "expected" ones (the task's throws): no "raised unexpected" line with
    # a traceback follows tierq's own, whose frames could hold the document
    assert not any(f"tierq.summarize[{j}] raised unexpected" in worker.text() for j in ids.values())
    leaks = {}
    for kind, job_id in ids.items():
        lines = [line for line in worker.text().splitlines() if job_id in line]
        leaks[kind] = [json.loads(line).get("event", "?")[:60] for line in lines if tags[kind] in line]
    row = chaos.record(
        tally(
            "8a logs: the lines of failed jobs",
            outcomes,
            chaos.sim.counter,
            [f"{kind}: document text in {leaked or 'no line'}" for kind, leaked in leaks.items()],
        )
    )
    assert [o["status"] for o in outcomes.values()] == ["failed", "failed"] and row.lost == 0
    assert leaks == {"rejected": [], "garbled": []}, "a failed job's log lines carry its document"
    assert chaos.api_key not in worker.text()


@pytest.mark.timeout(90)
def test_no_document_text_message_body_or_api_key_in_any_worker_log(
    chaos: Chaos, pool: Pool, producer: Producer
) -> None:
    """Every line of every chaos worker, except the frame locals of logged tracebacks (8a)."""
    # a job and a malformed message of its own, so that the check has lines to read when run alone
    pool.start("fast").wait_ready()
    tag = new_tag()
    text = document(tag, 40)
    chaos.secrets += [tag, text[:200]]
    submitted = producer.submit(text, "critical")
    assert submitted["ok"], submitted
    secret = f"CHAOSSECRET{uuid.uuid4().hex}"
    chaos.secrets.append(secret)
    bad_id = new_id("badjson")
    producer.publish(b'{"broken ' + secret.encode(), "application/json", {"id": bad_id}, "tierq.fast")
    job_id = str(submitted["job_id"])
    producer.wait_ended([job_id], timeout=30)
    wait_until(lambda: producer.dead_letters([bad_id])[bad_id], 30, "the malformed message's dead letter")
    outcomes = producer.outcomes([job_id])

    needles = _needles(chaos)
    lines, outside, inside = _grep(chaos.workers, needles)
    row = chaos.record(
        tally(
            "8b logs: every worker line of the suite",
            outcomes,
            chaos.sim.counter,
            [
                f"{len(outside)} hits for {len(needles)} needles in {lines} lines of {len(chaos.workers)} "
                f"worker logs; {len(inside)} more in the frame locals of logged tracebacks (8a)"
            ],
        )
    )
    assert row.completed == 1
    assert lines > 0
    assert any(w.events_for(job_id, "summarize.completed") for w in chaos.workers)
    assert outside == [], outside[:20]
    assert inside == [], "tracebacks are logged without their frames' locals"
