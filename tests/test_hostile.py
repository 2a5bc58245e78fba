"""The worker is the trust boundary: what any sender puts on a tier's queue, raw, as a service that
never read tierq's code (or an attacker) would.

Every case goes straight onto the fast tier's Redis list, as bytes. For each: the worker keeps
running, the delivery ends as a dead letter with its reason, a job with a usable id ends
``failed`` (never ``pending`` forever), nothing of the document reaches the log, and the next
normal job completes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tests.conftest import KEY_PREFIX, WorkerProcess
from tests.helpers import wait_until
from tierq import get_job, submit
from tierq.celery.request import redact_result_repr
from tierq.contract.errors import IdempotencyConflictError
from tierq.core.settings import get_tier_table
from tierq.sim import SimServer
from tierq.store.deadletter import DeadLetter, DeadLetterStore

pytestmark = pytest.mark.usefixtures("workers")

DOC = " ".join(
    f"Line {i}: a sender that never read our code must not be able to stop a worker." for i in range(20)
)
SECRET = f"HOSTILESECRET{uuid.uuid4().hex}"


def _queue_key() -> str:
    return f"{KEY_PREFIX}{get_tier_table().tiers['fast'].queue}"


def _envelope(body: bytes, headers: object, content_type: str = "application/json", **props: Any) -> bytes:
    """A kombu Redis envelope, as kombu writes it (body base64)."""
    properties: dict[str, Any] = {
        "body_encoding": "base64",
        "delivery_info": {"exchange": "tierq", "routing_key": "tierq.fast"},
        "delivery_mode": 2,
        "delivery_tag": str(uuid.uuid4()),
        "priority": 0,
        **props,
    }
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": properties,
    }
    return json.dumps(envelope).encode()


def _headers(job_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "task": "tierq.summarize", "lang": "py", **extra}


def _body(job: object, args: object = (), embed: object = None) -> bytes:
    return json.dumps([list(args) if isinstance(args, tuple) else args, {"job": job}, embed or {}]).encode()


def _job(job_id: str, **fields: Any) -> dict[str, Any]:
    return {"job_id": job_id, "tier": "fast", "text": f"{SECRET} {DOC}", **fields}


@dataclass
class Case:
    """One hostile delivery: the bytes pushed, the dead letter's reason, whether the id is usable."""

    entry: bytes
    reason: str
    job_id: str | None


def _message_case(job_id: str, body: bytes, reason: str, **headers: Any) -> Case:
    return Case(_envelope(body, _headers(job_id, **headers)), reason, job_id)


def _cases() -> dict[str, Callable[[str], Case]]:
    nested = b"[" * 100_000 + b"]" * 100_000
    return {
        # the list entry is not a kombu envelope: nothing in it can be trusted, not even an id
        "not JSON": lambda i: Case(f"garbage {SECRET}".encode(), "envelope: not JSON", None),
        "a JSON string": lambda i: Case(json.dumps(SECRET).encode(), "envelope: not a kombu message", None),
        "no properties": lambda i: Case(
            json.dumps({"body": SECRET, "headers": _headers(i)}).encode(),
            "envelope: not a kombu message",
            None,
        ),
        "body not base64": lambda i: Case(
            _envelope(b"", _headers(i)).replace(b'"body": ""', f'"body": "!{SECRET}!"'.encode()),
            "envelope: ",
            None,
        ),
        "headers a list": lambda i: Case(_envelope(_body(_job(i)), [1, 2]), "envelope: ", None),
        # a kombu message, but not a tierq job message
        "body [1]": lambda i: _message_case(i, b"[1]", "body: not [args, kwargs, embed]"),
        "body an object": lambda i: _message_case(
            i, json.dumps({"job": _job(i)}).encode(), "body: not [args"
        ),
        "empty kwargs": lambda i: _message_case(i, b"[[], {}, {}]", "body.kwargs.job: Field required"),
        "positional args": lambda i: _message_case(i, json.dumps([[_job(i)], {}, {}]).encode(), "body.args"),
        "job a string": lambda i: _message_case(i, _body(SECRET), "body.kwargs.job"),
        "a callback linked": lambda i: _message_case(
            i,
            _body(_job(i), embed={"callbacks": [{"task": "celery.backend_cleanup"}]}),
            "body.embed.callbacks",
        ),
        "job_id not the id": lambda i: _message_case(i, _body(_job(f"{i}-other")), "body.kwargs.job.job_id"),
        "body not JSON": lambda i: _message_case(i, f'{{"x": {SECRET}'.encode(), "undecodable: "),
        "body nested 100k deep": lambda i: _message_case(i, nested, "undecodable: "),
        "pickle": lambda i: Case(
            _envelope(b"\x80\x04" + SECRET.encode(), _headers(i), "application/x-python-serialize"),
            "undecodable: ",
            i,
        ),
        "no task header": lambda i: Case(
            _envelope(_body(_job(i)), {"id": i}), "headers.task: Field required", i
        ),
        "an id that is a number": lambda i: Case(
            _envelope(_body(_job(i)), {"id": 5, "task": "tierq.summarize"}), "headers.id", None
        ),
        "an id with spaces": lambda i: Case(
            _envelope(_body(_job(i)), _headers(f"{i} {SECRET}")), "headers.id", None
        ),
        "Celery's built-in task": lambda i: _message_case(
            i, _body(_job(i)), "unknown task 'celery.backend_cleanup'", task="celery.backend_cleanup"
        ),
        "timelimit not a pair": lambda i: _message_case(
            i, _body(_job(i)), "headers.timelimit", timelimit="x"
        ),
        "eta not a date": lambda i: _message_case(i, _body(_job(i)), "headers.eta", eta=SECRET),
        "deadline not a number": lambda i: _message_case(
            i, _body(_job(i)), "headers.tierq_deadline", tierq_deadline="soon"
        ),
        "100 headers": lambda i: _message_case(
            i, _body(_job(i)), "headers: 10", **{f"x-{n}": n for n in range(100)}
        ),
        "a 40 kB header": lambda i: _message_case(i, _body(_job(i)), "headers: 4", note=SECRET * 1000),
    }


def _job_cases() -> dict[str, Callable[[str], dict[str, Any]]]:
    """Well-formed messages whose job breaks the tier's rules: checked where they run."""
    return {
        "a slow job on the fast queue": lambda i: _job(i, tier="slow"),
        "300k characters on the fast tier": lambda i: _job(i, text=SECRET + "x" * 300_000),
        "max_tokens above the cap": lambda i: _job(i, max_tokens=64_000),
        "metadata 12 levels deep": lambda i: _job(i, metadata={"a": json.loads("[" * 12 + "1" + "]" * 12)}),
        "an unknown field": lambda i: _job(i, colour="red"),
        "an unknown tier": lambda i: _job(i, tier=SECRET[:20].lower()),
    }


def _store(redis_client: redis.Redis) -> DeadLetterStore:
    return DeadLetterStore(redis_client, KEY_PREFIX)


def _decoded_body(entry: bytes) -> bytes:
    """The message body inside a kombu envelope, when there is one to decode."""
    try:
        return base64.b64decode(json.loads(entry)["body"], validate=True)
    except (ValueError, KeyError, TypeError):
        return b""


def _letter(store: DeadLetterStore, case: Case) -> DeadLetter | None:
    """The case's dead letter: under its job id, else under a hash of what the worker could read."""
    if case.job_id is not None:
        return store.get(case.job_id)
    for raw in (case.entry, _decoded_body(case.entry)):
        letter = store.get(f"malformed-{hashlib.sha256(raw).hexdigest()[:24]}") if raw else None
        if letter is not None:
            return letter
    return None


def test_hostile_deliveries_are_dead_lettered_and_the_worker_keeps_serving(
    workers: dict[str, WorkerProcess], redis_client: redis.Redis
) -> None:
    fast = workers["fast"]
    store = _store(redis_client)
    cases = {
        name: make(f"hostile-{n}-{uuid.uuid4().hex[:8]}") for n, (name, make) in enumerate(_cases().items())
    }
    jobs = {
        name: make(f"badjob-{n}-{uuid.uuid4().hex[:8]}")
        for n, (name, make) in enumerate(_job_cases().items())
    }
    for case in cases.values():
        redis_client.lpush(_queue_key(), case.entry)
    for job in jobs.values():
        body = _body(job)
        redis_client.lpush(_queue_key(), _envelope(body, _headers(job["job_id"])))
    # a message that lies about its queue: the queue is the list the worker popped it from
    lies = {
        "a slow job claiming the slow queue": {"exchange": "tierq", "routing_key": "tierq.slow"},
        "a slow job naming no queue": {"exchange": "", "routing_key": None},
    }
    for n, (name, delivery_info) in enumerate(lies.items()):
        job = _job(f"liar-{n}-{uuid.uuid4().hex[:8]}", tier="slow")
        jobs[name] = job
        entry = _envelope(_body(job), _headers(job["job_id"]), delivery_info=delivery_info)
        redis_client.lpush(_queue_key(), entry)

    def letters() -> dict[str, DeadLetter | None]:
        found = {name: _letter(store, case) for name, case in cases.items()}
        found.update({name: store.get(job["job_id"]) for name, job in jobs.items()})
        return found

    def missing() -> list[str]:
        return [name for name, letter in letters().items() if letter is None]

    try:
        wait_until(lambda: not missing(), 60, "a dead letter for every hostile delivery", fast.check)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; none for: {', '.join(missing())}") from None
    found = letters()
    outcome = {}
    for name, case in cases.items():
        letter = found[name]
        assert letter is not None
        outcome[name] = letter.reason
        assert letter.reason.startswith(case.reason), (name, letter.reason)
        assert letter.error_type == "MalformedMessage"
        if case.job_id is not None:
            assert get_job(case.job_id).status() == "failed", name
    for name, job in jobs.items():
        letter = found[name]
        assert letter is not None and letter.error_type == "InvalidJobError", (name, letter)
        outcome[name] = letter.error
        assert letter.tier == "fast", "the queue's tier, never a name from the body"
        assert get_job(job["job_id"]).status() == "failed", name
        [line] = fast.wait_for(job["job_id"], "summarize.failed")
        assert line["reason"] == "invalid job" and line["tier"] == "fast"
    print("\nhostile case -> dead letter reason")
    for name, reason in outcome.items():
        print(f"  {name:36} {reason[:90]}")

    assert fast.proc.poll() is None, "the worker is still running"
    assert submit(DOC, urgency="critical").result(timeout=30).tier == "fast", "the next job completes"
    log = fast.log_path.read_text(encoding="utf-8", errors="replace")
    assert SECRET not in log, "no message body, header or document in the worker's log"
    rejected = [e for e in fast.log_events() if e["event"] == "message.rejected"]
    assert all(len(json.dumps(e)) < 2_000 for e in rejected), "sender-controlled strings are bounded"


def test_a_foreign_job_without_tierq_headers_runs_with_the_tiers_defaults(
    workers: dict[str, WorkerProcess], redis_client: redis.Redis, sim: SimServer
) -> None:
    job_id = f"foreign-{uuid.uuid4().hex[:12]}"
    job = {"job_id": job_id, "tier": "fast", "text": DOC}
    # plain Celery's own repr of the arguments would carry the document: the worker never shows it
    headers = _headers(job_id, kwargsrepr=repr({"job": {**job, "text": SECRET}}), argsrepr=SECRET)
    redis_client.lpush(_queue_key(), _envelope(_body(job), headers))
    result = get_job(job_id).result(timeout=30)
    assert result.timings.queue_wait_ms is None, "no enqueue time was given: none is made up"
    [line] = workers["fast"].wait_for(job_id, "summarize.completed")
    assert line["enqueued_at"] == "first_seen"
    assert sim.state.request_count(job_id) == 1
    assert SECRET not in workers["fast"].log_path.read_text(encoding="utf-8", errors="replace")


def test_one_job_id_cannot_name_two_requests(
    workers: dict[str, WorkerProcess], redis_client: redis.Redis, sim: SimServer
) -> None:
    job_id = f"idem-{uuid.uuid4().hex[:12]}"
    first = submit(DOC, urgency="critical", job_id=job_id)
    summary = first.result(timeout=30).summary
    again = submit(DOC, urgency="critical", job_id=job_id)
    assert again.duplicate and again.result(timeout=5).summary == summary
    with pytest.raises(IdempotencyConflictError) as raised:
        submit(f"{SECRET} another document", urgency="critical", job_id=job_id)
    assert raised.value.field == "job_id"

    # a sender that bypasses submit() reuses the id for another document: it is not run, and the
    # first job's result stays the first job's
    other = {"job_id": job_id, "tier": "fast", "text": f"{SECRET} another document"}
    redis_client.lpush(_queue_key(), _envelope(_body(other), _headers(job_id)))
    [line] = workers["fast"].wait_for(job_id, "summarize.failed")
    assert (line["reason"], line["error_type"]) == ("idempotency_conflict", "IdempotencyConflictError")
    letters = [x for x in _store(redis_client).list(500) if x.job_id.startswith(f"{job_id}~")]
    assert len(letters) == 1 and letters[0].reason == "idempotency_conflict"
    assert _store(redis_client).get(job_id) is None, "the first job's id holds no dead letter"
    assert get_job(job_id).status() == "succeeded"
    assert get_job(job_id).result(timeout=5).summary == summary
    assert sim.state.request_count(job_id) == 1, "the conflicting request never reached the model"


def test_the_flower_result_repr_hides_metadata_and_summary() -> None:
    text = repr(
        {"job_id": "j", "tier": "fast", "cost_usd": 0.1, "metadata": {"k": SECRET}, "summary": SECRET}
    )
    shown = redact_result_repr(text)
    assert SECRET not in shown and "'cost_usd': 0.1" in shown
    truncated = text[: text.index("'summary'") + 20]  # Celery cuts long reprs
    assert SECRET not in redact_result_repr(truncated)
