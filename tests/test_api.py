"""The HTTP API (``tierq api``) on a real uvicorn server on loopback, over real workers and Redis."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from structlog.testing import capture_logs

from tests.conftest import KEY_PREFIX, WorkerProcess
from tests.helpers import run_tierq, wait_until
from tierq import Producer, submit
from tierq.api import TokenTable, hash_token, make_api
from tierq.api.app import body_limit
from tierq.core.settings import get_settings
from tierq.ops.embedded import free_port
from tierq.sim import SimServer
from tierq.store.keys import Keys
from tierq.store.ratelimit import SharedRateLimiter
from tierq.store.streams import StreamEntry, TokenPublisher, read_entries

DOC = " ".join(
    f"Section {i} of the agreement says the supplier ships every order within {i + 2} days."
    for i in range(40)
)
TOKENS = {"alpha": secrets.token_urlsafe(24), "beta": secrets.token_urlsafe(24)}
PROBLEM = "application/problem+json"

pytestmark = pytest.mark.usefixtures("workers")


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` on a uvicorn server in a thread; yield its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=free_port(), log_config=None, access_log=False, lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "the API server to start", interval=0.01)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def producer() -> Producer:
    return Producer(get_settings())


@pytest.fixture(scope="module")
def api_url(producer: Producer) -> Iterator[str]:
    tokens = TokenTable({name: hash_token(token) for name, token in TOKENS.items()})
    with serve(make_api(producer, tokens)) as url:
        yield url


def client_for(url: str, name: str | None) -> httpx2.Client:
    headers = {"Authorization": f"Bearer {TOKENS[name]}"} if name else {}
    return httpx2.Client(base_url=url, headers=headers, timeout=30)


@pytest.fixture()
def alpha(api_url: str) -> Iterator[httpx2.Client]:
    with client_for(api_url, "alpha") as client:
        yield client


@pytest.fixture()
def beta(api_url: str) -> Iterator[httpx2.Client]:
    with client_for(api_url, "beta") as client:
        yield client


def problem(response: httpx2.Response, status: int) -> dict[str, Any]:
    """The response's problem details, checked to be RFC 9457 with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    return body


def wait_for_status(
    client: httpx2.Client, job_id: str, done: Callable[[str], bool], timeout: float = 30
) -> Any:
    """The job's view once ``done(status)``."""

    def probe() -> Any:
        view = client.get(f"/v1/jobs/{job_id}").json()
        return view if done(view["status"]) else None

    return wait_until(probe, timeout, f"job {job_id} to reach a status", interval=0.05)


def read_events(
    response: httpx2.Response, stop: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Server-sent events of ``response`` as dicts (id, event, data), until ``stop(events)`` or its end."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if current:
                events.append(current)
                current = {}
                if stop(events):
                    break
            continue
        name, _, value = line.partition(": ")
        current[name] = json.loads(value) if name == "data" else value
    return events


# ---------------------------------------------------------------------------------------------
# the doors that need no token


def test_health_openapi_and_metrics_need_no_token(api_url: str) -> None:
    with client_for(api_url, None) as anyone:
        assert anyone.get("/healthz").json() == {"status": "ok"}
        spec = anyone.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events"} <= set(spec["paths"])
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert set(spec["paths"]["/v1/jobs/{job_id}"]) == {"get", "delete"}
        assert "tierq_api_requests_total" in anyone.get("/metrics").text


# ---------------------------------------------------------------------------------------------
# auth


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {TOKENS['alpha']}"}],
    ids=["no token", "unknown token", "not bearer"],
)
def test_a_request_without_a_valid_token_is_refused(api_url: str, headers: dict[str, str]) -> None:
    with httpx2.Client(base_url=api_url, headers=headers) as client:
        refused = client.post("/v1/jobs", json={"text": DOC, "urgency": "high"})
        assert problem(refused, 401)["title"] == "Unauthorized"
        assert refused.headers["www-authenticate"].startswith("Bearer")
        # refused before the body is read: malformed JSON is not what it is told
        problem(
            client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 401
        )
        problem(client.get("/v1/jobs/alpha.anything"), 401)


def test_a_producer_reads_only_its_own_jobs(alpha: httpx2.Client, beta: httpx2.Client) -> None:
    accepted = alpha.post("/v1/jobs", json={"text": DOC, "urgency": "high"})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert job_id.startswith("alpha.")
    for response in (
        beta.get(f"/v1/jobs/{job_id}"),
        beta.get(f"/v1/jobs/{job_id}/events"),
        beta.delete(f"/v1/jobs/{job_id}"),
    ):
        assert problem(response, 404)["title"] == "Not found"
    # under its own name, an id never submitted is not found either
    problem(alpha.get(f"/v1/jobs/alpha.{uuid.uuid4().hex}"), 404)
    problem(alpha.get("/v1/jobs/alpha.no spaces"), 404)
    assert wait_for_status(alpha, job_id, lambda s: s == "succeeded")["result"]["job_id"] == job_id


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": DOC, "urgency": "high", "max_tokens": 10**6}, "max_tokens"),
        ({"text": DOC, "urgency": "bogus"}, "urgency"),
        ({"text": "   ", "urgency": "high"}, "text"),
        ({"text": "x" * 50_001, "urgency": "high"}, "text"),
        ({"text": DOC, "urgency": "high", "deadline_s": 16}, "deadline_s"),
        ({"text": DOC, "urgency": "high", "temperature": 0.2}, "temperature"),
        ({"urgency": "high"}, "text"),
        ({"text": DOC, "max_tokens": "12"}, "max_tokens"),
        ({"text": DOC, "metadata": ["not", "an", "object"]}, "metadata"),
        ({"text": DOC, "stream": "yes"}, "stream"),
    ],
    ids=[
        "max_tokens above the cap",
        "unknown urgency",
        "blank text",
        "text over the tier's limit",
        "deadline past the tier's",
        "unknown field",
        "missing text",
        "number as string",
        "metadata not an object",
        "stream not a boolean",
    ],
)
def test_an_invalid_field_is_named_and_nothing_is_enqueued(
    alpha: httpx2.Client, workers: dict[str, WorkerProcess], body: dict[str, Any], field: str
) -> None:
    before = workers["fast"].queue_depths()
    key = f"invalid-{uuid.uuid4().hex}"
    refused = problem(alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}), 422)
    assert refused["field"] == field
    assert refused["detail"].startswith(field)
    assert DOC not in json.dumps(refused), "a problem names the field, never echoes the input"
    assert workers["fast"].queue_depths() == before
    # nothing was claimed either: the key is still free for a valid request
    ok = alpha.post("/v1/jobs", json={"text": DOC, "urgency": "high"}, headers={"Idempotency-Key": key})
    assert ok.status_code == 202 and not ok.json()["duplicate"]
    wait_for_status(alpha, ok.json()["job_id"], lambda s: s == "succeeded")  # out of the next case's queue


def test_a_job_that_cannot_start_before_its_deadline_is_429_with_retry_after(
    alpha: httpx2.Client, producer: Producer, workers: dict[str, WorkerProcess], redis_client: redis.Redis
) -> None:
    model = producer.tiers.tiers["fast"].model
    limiter = SharedRateLimiter.from_settings(redis_client, producer.settings)
    assert limiter is not None and producer.admission is not None
    before = workers["fast"].queue_depths()
    key = f"late-{uuid.uuid4().hex}"
    try:
        limiter.block(model, 40.0)  # the API's 429 held the fast tier's model past its 15 s deadline
        producer.admission.refresh()
        body = {"text": DOC, "urgency": "high"}
        refused = alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        problem_body = problem(refused, 429)
        assert problem_body["type"] == "urn:tierq:problem:deadline-unmeetable"
        assert 25 <= int(refused.headers["Retry-After"]) <= 41
        assert "nothing was enqueued" in problem_body["detail"] and DOC not in refused.text
        assert workers["fast"].queue_depths() == before
    finally:
        redis_client.hdel(limiter.keys.rate_limit(model), "blocked_until")
        producer.admission.refresh()
    # the key was not kept: the same request is admitted once the hold is over
    again = alpha.post("/v1/jobs", json={"text": DOC, "urgency": "high"}, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and not again.json()["duplicate"]
    wait_for_status(alpha, again.json()["job_id"], lambda s: s == "succeeded")


def test_malformed_json_and_a_bad_idempotency_key(alpha: httpx2.Client) -> None:
    malformed = alpha.post("/v1/jobs", content=b'{"text": ', headers={"content-type": "application/json"})
    assert problem(malformed, 400)["field"] == "body"
    for key in ("has space", "k" * 65, "slash/key"):
        bad = alpha.post("/v1/jobs", json={"text": DOC}, headers={"Idempotency-Key": key})
        assert problem(bad, 422)["field"] == "Idempotency-Key"


def test_an_oversize_body_is_refused_before_it_is_parsed(alpha: httpx2.Client, producer: Producer) -> None:
    limit = body_limit(producer)
    assert limit == 1024 * 1024 + 4 * 600_000  # the slow tier takes 600,000 characters
    # declared too large: refused unread
    declared = alpha.post(
        "/v1/jobs", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    assert problem(declared, 413)["field"] == "body"

    # chunked, no Content-Length: counted as it comes
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(limit // 65_536 + 1):
            yield b"y" * 65_536
        yield b'"}'

    counted = alpha.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in counted.request.headers
    problem(counted, 413)
    # just under the limit is read and parsed: the text is then judged by the tier's own limit
    big = alpha.post("/v1/jobs", json={"text": "z" * 600_001, "urgency": "low"})
    assert problem(big, 422)["field"] == "text"


# ---------------------------------------------------------------------------------------------
# idempotency


def test_an_idempotency_key_enqueues_one_job(
    alpha: httpx2.Client, beta: httpx2.Client, sim: SimServer
) -> None:
    key = f"order-{uuid.uuid4().hex[:12]}"
    body = {"text": DOC, "urgency": "high", "metadata": {"order": 7}}
    first = alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    assert first.json() == {"job_id": job_id, "status": "pending", "duplicate": False}
    assert job_id == f"alpha.{key}"
    assert first.headers["location"] == f"/v1/jobs/{job_id}"

    again = alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202
    assert again.json()["job_id"] == job_id and again.json()["duplicate"] is True

    changed = alpha.post(
        "/v1/jobs", json={**body, "metadata": {"order": 8}}, headers={"Idempotency-Key": key}
    )
    conflict = problem(changed, 409)
    assert conflict["type"].endswith("idempotency-conflict") and conflict["field"] == "Idempotency-Key"

    # another producer's same key is another job
    theirs = beta.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert theirs.status_code == 202 and theirs.json() == {
        "job_id": f"beta.{key}",
        "status": "pending",
        "duplicate": False,
    }
    done = wait_for_status(alpha, job_id, lambda s: s == "succeeded")
    assert done["result"]["metadata"] == {"order": 7}
    wait_for_status(beta, f"beta.{key}", lambda s: s == "succeeded")
    assert sim.state.request_count(job_id) == 1, "the duplicate submit never reached the model"
    late = alpha.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert late.json() == {"job_id": job_id, "status": "succeeded", "duplicate": True}


# ---------------------------------------------------------------------------------------------
# a job's life over HTTP


def test_a_job_end_to_end(alpha: httpx2.Client, workers: dict[str, WorkerProcess]) -> None:
    accepted = alpha.post(
        "/v1/jobs",
        json={"text": DOC, "urgency": "critical", "instructions": "One sentence.", "max_tokens": 64},
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    view = wait_for_status(alpha, job_id, lambda s: s not in ("pending", "running", "retrying"))
    assert view["status"] == "succeeded" and view["error"] is None
    result = view["result"]
    assert result["job_id"] == job_id and result["tier"] == "fast" and result["model"] == "claude-haiku-4-5"
    assert result["summary"].strip() and result["usage"]["output_tokens"] <= 64
    assert result["timings"]["queue_wait_ms"] is not None
    [line] = workers["fast"].wait_for(job_id, "summarize.completed")
    assert line["job_id"] == job_id
    # a finished job cannot be cancelled
    ended = problem(alpha.delete(f"/v1/jobs/{job_id}"), 409)
    assert ended["type"].endswith("job-ended") and "succeeded" in ended["detail"]
    assert alpha.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_a_failed_job_reports_its_error(alpha: httpx2.Client, sim: SimServer) -> None:
    key = f"fails-{uuid.uuid4().hex[:8]}"
    sim.state.add_faults(["400"], job_id=f"alpha.{key}")
    accepted = alpha.post("/v1/jobs", json={"text": DOC, "urgency": "high"}, headers={"Idempotency-Key": key})
    view = wait_for_status(alpha, accepted.json()["job_id"], lambda s: s == "failed")
    assert view["result"] is None
    assert view["error"]["type"] == "RequestRejectedError" and "400" in view["error"]["message"]


def test_events_resume_after_the_last_event_id(alpha: httpx2.Client) -> None:
    accepted = alpha.post("/v1/jobs", json={"text": DOC, "urgency": "normal", "stream": True})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    url = f"/v1/jobs/{job_id}/events"
    with alpha.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        first = read_events(response, stop=lambda events: any(e["event"] == "text" for e in events))
    # the connection is closed after the first text: reconnect where it stopped
    assert first and first[-1]["event"] == "text", first
    with alpha.stream("GET", url, headers={"Last-Event-ID": first[-1]["id"]}) as response:
        rest = read_events(response, stop=lambda events: events[-1]["event"] in ("result", "error"))
    assert rest[-1]["event"] == "result", rest
    texts = [e for e in first + rest if e["event"] == "text"]
    assert len(texts) >= 2, "the summary came in more than one piece"
    ids = [e["id"] for e in texts]
    as_numbers = [tuple(int(p) for p in i.split("-")) for i in ids]
    assert as_numbers == sorted(set(as_numbers)), "no event twice, in order"
    result = rest[-1]["data"]
    assert result["job_id"] == job_id
    assert "".join(e["data"]["text"] for e in texts) == result["summary"]
    assert not [e for e in first + rest if e["event"] == "restarted"]

    # a reader that comes after the end gets the whole text and the result from the start
    with alpha.stream("GET", url) as response:
        replay = read_events(response, stop=lambda events: False)
    assert [e for e in replay if e["event"] == "text"] == texts
    assert replay[-1]["event"] == "result" and replay[-1]["data"] == result
    # and one that resumes after the last text gets just the result
    with alpha.stream("GET", url, headers={"Last-Event-ID": texts[-1]["id"]}) as response:
        assert [e["event"] for e in read_events(response, stop=lambda events: False)] == ["result"]
    problem(alpha.get(url, headers={"Last-Event-ID": "not-an-id"}), 422)


def test_resuming_after_an_abandoned_run_announces_the_restart(redis_client: redis.Redis) -> None:
    key = Keys(KEY_PREFIX).tokens(f"resume-{uuid.uuid4().hex}")
    TokenPublisher(redis_client, key, run=0).send("the lost run's text")  # its worker died here
    rerun = TokenPublisher(redis_client, key, run=1)
    rerun.send("The new run")
    rerun.send(" from the top.")
    rerun.end("succeeded")
    (lost_id, _), *_ = redis_client.xrange(key)

    def read(after: str | None) -> list[StreamEntry]:
        return [e for e in read_entries(redis_client, key, time.monotonic() + 5, after) if e is not None]

    # a reader that had the lost run's text is told, then gets the new run from its start
    resumed = read(lost_id.decode())
    assert [(e.restarted, e.run, e.text) for e in resumed[:-1]] == [
        (True, 1, None),
        (False, 1, "The new run"),
        (False, 1, " from the top."),
    ]
    assert resumed[-1].end == "succeeded" and resumed[-1].id
    # one resuming inside the new run gets the rest of it, no restart
    rest = read(resumed[1].id)
    assert [e.text for e in rest] == [" from the top.", None] and not any(e.restarted for e in rest)
    # and a reader from the start never sees the lost run at all
    assert [e.text for e in read(None) if e.text] == ["The new run", " from the top."]


def test_a_job_that_does_not_stream_has_just_its_result(alpha: httpx2.Client) -> None:
    job_id = alpha.post("/v1/jobs", json={"text": DOC, "urgency": "high"}).json()["job_id"]
    with alpha.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = read_events(response, stop=lambda events: False)
    assert [e["event"] for e in events] == ["result"]
    assert events[0]["data"]["job_id"] == job_id and events[0]["data"]["summary"]


def test_a_queued_job_is_cancelled_unrun(alpha: httpx2.Client, sim: SimServer) -> None:
    blockers = []
    for _ in range(2):  # the slow pool has 2 threads: hold both for 2 s
        blocker_id = f"api-blocker-{uuid.uuid4()}"
        sim.state.add_faults(["stall:2"], job_id=blocker_id)
        blockers.append(submit(DOC, urgency="low", job_id=blocker_id))
    wait_until(lambda: all(sim.state.request_count(b.id) for b in blockers), 10, "both slow threads busy")
    accepted = alpha.post("/v1/jobs", json={"text": DOC, "urgency": "low", "stream": True})
    job_id = accepted.json()["job_id"]
    assert alpha.get(f"/v1/jobs/{job_id}").json()["status"] == "pending"

    cancelled = alpha.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json() == {"job_id": job_id, "status": "cancelling"}
    view = wait_for_status(alpha, job_id, lambda s: s == "cancelled")
    assert view["result"] is None and view["error"]["type"]
    assert sim.state.request_count(job_id) == 0, "a cancelled job never reaches the model"
    problem(alpha.delete(f"/v1/jobs/{job_id}"), 409)
    with alpha.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        events = read_events(response, stop=lambda events: False)
    assert [e["event"] for e in events] == ["error"] and events[0]["data"]["status"] == "cancelled"
    for blocker in blockers:
        blocker.result(timeout=30)


# ---------------------------------------------------------------------------------------------
# what the operator sees


def test_one_log_line_per_request_without_the_text(alpha: httpx2.Client, api_url: str) -> None:
    secret = f"confidential-{uuid.uuid4().hex}"
    with capture_logs() as logs:
        accepted = alpha.post("/v1/jobs", json={"text": f"{secret} {DOC}", "urgency": "high"})
        job_id = accepted.json()["job_id"]
        alpha.get(f"/v1/jobs/{job_id}")
        alpha.get("/v1/jobs/alpha.missing")

        def lines() -> list[dict[str, Any]]:
            found = [e for e in logs if e["event"] == "api.request"]
            return found if len(found) >= 3 else []

        found = wait_until(lines, 10, "three api.request lines")
    assert [(e["method"], e["path"], e["status"], e["producer"]) for e in found] == [
        ("POST", "/v1/jobs", 202, "alpha"),
        ("GET", "/v1/jobs/{job_id}", 200, "alpha"),
        ("GET", "/v1/jobs/{job_id}", 404, "alpha"),
    ]
    assert all(e["duration_ms"] >= 0 for e in found)
    assert secret not in repr(logs)
    with client_for(api_url, None) as anyone:
        metrics = anyone.get("/metrics").text
    assert 'tierq_api_requests_total{method="POST",producer="alpha",route="/v1/jobs",status="202"}' in metrics
    assert 'tierq_api_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}"}' in metrics


def test_without_tokens_every_caller_is_anonymous(producer: Producer) -> None:
    with serve(make_api(producer, None)) as url, httpx2.Client(base_url=url) as client:
        accepted = client.post(
            "/v1/jobs", json={"text": DOC, "urgency": "high"}, headers={"Idempotency-Key": "k1"}
        )
        assert accepted.json()["job_id"] == "anonymous.k1"
        assert wait_for_status(client, "anonymous.k1", lambda s: s == "succeeded")["result"]["summary"]


def test_the_cli_refuses_to_serve_without_tokens() -> None:
    done = run_tierq(
        ["api", "--port", str(free_port())], env={"TIERQ_API_TOKENS": "", "TIERQ_API_TOKENS_FILE": ""}
    )
    assert done.returncode == 2
    assert "--insecure-no-auth" in done.stderr
    bad = run_tierq(["api"], env={"TIERQ_API_TOKENS": "alpha:not-a-hash"})
    assert bad.returncode == 2 and "SHA-256" in bad.stderr and "not-a-hash" not in bad.stderr
