"""Bad input: malformed messages, an oversized text, and a poison job that kills its worker every time."""

from __future__ import annotations

import functools
import json
import time
import uuid

import pytest

from tests.chaos.conftest import Chaos, Pool
from tests.chaos.harness import Producer, document, new_id, new_tag, queued, tally
from tests.helpers import run_tierq, wait_until
from tierq.core.settings import MAX_CRASHES
from tierq.store.keys import Keys

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

#: the chaos tiers file gives the standard tier max_retries = 1: a job may start 1 + 1 + MAX_CRASHES
#: times; the next start gives it up
STANDARD_MAX_RETRIES = 1
ALLOWED_STARTS = STANDARD_MAX_RETRIES + 1 + MAX_CRASHES
#: the fast tier's max_input_chars (the default table)
FAST_MAX_INPUT_CHARS = 50_000


def _dlq_list(chaos: Chaos) -> list[dict[str, object]]:
    """``tierq dlq list --json``, the operator's view."""
    done = run_tierq(["dlq", "list", "--json", "--limit", "500"], chaos.env, inherit_env=False)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


@pytest.mark.timeout(180)
def test_malformed_oversized_and_poison_messages(chaos: Chaos, pool: Pool, producer: Producer) -> None:
    fast = pool.start("fast")
    standard = pool.start("standard")
    fast.wait_ready()
    counter = chaos.sim.counter

    # malformed: undecodable JSON, pickle (refused), a task nobody knows; each carries a secret
    secret = f"CHAOSSECRET{uuid.uuid4().hex}"
    chaos.secrets.append(secret)
    bad = {name: f"{name}-{uuid.uuid4().hex[:12]}" for name in ("badjson", "pickle", "unknown")}
    task = "tierq.summarize"
    producer.publish(
        b'{"not json ' + secret.encode(),
        "application/json",
        {"id": bad["badjson"], "task": task},
        "tierq.fast",
    )
    producer.publish(
        b"\x80\x04" + secret.encode(), "application/x-python-serialize", {"id": bad["pickle"]}, "tierq.fast"
    )
    body = json.dumps([[], {"job": {"job_id": bad["unknown"], "tier": "fast", "text": secret}}, {}]).encode()
    producer.publish(
        body, "application/json", {"id": bad["unknown"], "task": "tierq.nope", "lang": "py"}, "tierq.fast"
    )
    wait_until(
        lambda: all(producer.dead_letters(bad.values()).values()), 30, "the malformed messages' dead letters"
    )
    letters = producer.dead_letters(bad.values())

    # oversized: refused by submit, nothing enqueued
    big_tag = new_tag()
    big = document(big_tag, 1000)
    assert len(big) > FAST_MAX_INPUT_CHARS
    chaos.secrets += [big_tag, big[:200]]
    before = queued(chaos.client, chaos.prefix, "tierq.fast")
    big_id = new_id("big")
    refused = producer.submit(big, "critical", job_id=big_id)
    after = queued(chaos.client, chaos.prefix, "tierq.fast")

    # the worker that saw the malformed messages still serves
    tag = new_tag()
    text = document(tag, 40)
    chaos.secrets += [tag, text[:200]]
    normal = producer.submit(text, "high")
    assert normal["ok"], normal

    # poison: every start of the job kills its worker (here: SIGKILL as soon as the start is counted)
    standard.wait_ready()
    tag = new_tag()
    poison = new_id("poison")
    chaos.sim.state.add_faults(["stall:60"] * (ALLOWED_STARTS + 2), job_id=poison)  # a call never ends
    text = document(tag, 40)
    chaos.secrets += [tag, text[:200]]
    submitted = producer.submit(text, "normal", job_id=poison)
    assert submitted["ok"], submitted
    starts_key = chaos.key("starts", poison)
    current, kills = standard, 0
    started = time.monotonic()

    def started_more_than(count: int) -> bool:
        return int(chaos.client.get(starts_key) or 0) > count  # type: ignore[arg-type]

    while kills < ALLOWED_STARTS and time.monotonic() - started < 120:
        wait_until(
            functools.partial(started_more_than, kills),
            60,
            f"start {kills + 1} of the poison job",
            current.check,
            interval=0.01,
        )
        current.kill()
        kills += 1
        current = pool.start("standard")
    producer.wait_ended([poison, str(normal["job_id"])], timeout=60)
    loop_s = round(time.monotonic() - started, 1)
    outcomes = producer.outcomes([str(normal["job_id"]), poison])
    listed = {str(row["job_id"]): row for row in _dlq_list(chaos)}
    starts = int(chaos.client.get(starts_key) or 0)

    row = chaos.record(
        tally(
            "7 malformed, oversized, poison",
            outcomes,
            counter,
            [
                f"{sum(1 for j in bad.values() if j in listed)}/3 malformed dead-lettered",
                f"oversized refused: {refused['error_type']}({refused['field']})",
                f"poison: {kills} workers killed, {starts} starts, {outcomes[poison]['status']} "
                f"{outcomes[poison].get('error_type')} after {loop_s} s",
            ],
        )
    )
    assert row.lost == 0 and row.duplicates == 0, outcomes
    reasons = {name: str(letters[job_id]["reason"]) for name, job_id in bad.items()}  # type: ignore[index]
    assert reasons["badjson"].startswith("undecodable: "), reasons
    assert reasons["pickle"].startswith("undecodable: "), reasons
    assert reasons["unknown"].startswith("unknown task 'tierq.nope'"), reasons
    assert fast.alive(), "malformed messages do not stop the worker"
    assert outcomes[str(normal["job_id"])]["status"] == "succeeded"

    assert (refused["ok"], refused["error_type"], refused["field"]) == (False, "InvalidJobError", "text")
    assert before == after == 0, "nothing was enqueued for the oversized text"
    assert not chaos.client.exists(Keys(chaos.prefix).submitted(big_id))
    assert counter.requests(big_id) == 0

    assert (outcomes[poison]["status"], outcomes[poison]["error_type"]) == ("failed", "PoisonJobError")
    assert starts == ALLOWED_STARTS + 1, "given up at the first start past the allowance, unrun"
    assert listed[poison]["error_type"] == "PoisonJobError" and listed[poison]["tier"] == "standard"
    assert counter.completed(poison) == 0
    assert secret not in json.dumps(listed), "dead-letter listings show no message body"
