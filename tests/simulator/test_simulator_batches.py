"""The simulator serves the Message Batches API strictly: create, retrieve, list, cancel, delete,
results as JSON lines, the documented limits, processing times scaled by ``time_scale``, and
scripted per-request outcomes (``errored``, ``expired``) keyed by ``custom_id``.

Everything goes through the real SDK over HTTP (plain httpx2 only where the SDK refuses to send
the request itself); nothing is patched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from tests.helpers import SIM_TODAY, FakeClock, wait_until
from tierq.sim import SimConfig, SimServer
from tierq.sim.batches import (
    BATCH_BASE_S,
    BATCH_EXPIRY_S,
    BATCH_PER_REQUEST_S,
    CANCEL_DRAIN_S,
    MAX_BATCH_BYTES,
    MAX_BATCH_REQUESTS,
)

MODEL = "claude-haiku-4-5"
DOC = (
    "Tierq runs Celery workers that summarize documents with Claude. "
    "Each tier has its own worker pool, so slow jobs never block fast ones. "
    "Redis is the broker and keeps the queues for every tier."
)
#: a batch of 3 takes (120 + 3 * 0.25) * 0.002 = 0.24 s here
FAST_SCALE = 0.002


def params(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 200, "messages": [{"role": "user", "content": DOC}], **extra}


def requests_for(*custom_ids: str, **extra: Any) -> list[Any]:
    return [{"custom_id": cid, "params": params(**extra)} for cid in custom_ids]


@pytest.fixture(scope="module")
def sim_config() -> SimConfig:
    return SimConfig(time_scale=FAST_SCALE, seed=7, today=SIM_TODAY)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def slow(clock: FakeClock) -> Iterator[SimServer]:
    """Real-speed batches on a clock that moves only when the test says."""
    with SimServer(SimConfig(time_scale=1.0, seed=7, clock=clock)) as server:
        yield server


@pytest.fixture
def slow_client(slow: SimServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="sim-key", base_url=slow.url, max_retries=0) as c:
        yield c


def ended(client: anthropic.Anthropic, batch_id: str) -> MessageBatch:
    def probe() -> MessageBatch | None:
        batch = client.messages.batches.retrieve(batch_id)
        return batch if batch.processing_status == "ended" else None

    return wait_until(probe, 10, f"batch {batch_id} to end")


def results(client: anthropic.Anthropic, batch_id: str) -> dict[str, MessageBatchIndividualResponse]:
    lines = list(client.messages.batches.results(batch_id))
    by_id = {line.custom_id: line for line in lines}
    assert len(by_id) == len(lines), "one result per custom_id"
    return by_id


def refused(client: anthropic.Anthropic, requests: list[Any]) -> str:
    """Create a batch that must be refused with 400 ``invalid_request_error``; return the message."""
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.create(requests=requests)
    body: Any = info.value.body
    assert body["error"]["type"] == "invalid_request_error"
    message: str = body["error"]["message"]
    return message


# --- the whole life of a batch -----------------------------------------------------------------------


def test_a_batch_runs_to_its_end_and_every_custom_id_has_its_message(client: anthropic.Anthropic) -> None:
    created = client.messages.batches.create(requests=requests_for("doc-1", "doc-2", "doc_3"))
    assert created.id.startswith("msgbatch_")
    assert created.type == "message_batch"
    assert created.processing_status == "in_progress"
    assert created.results_url is None and created.ended_at is None
    assert created.request_counts.processing == 3
    assert (created.expires_at - created.created_at).total_seconds() == BATCH_EXPIRY_S

    batch = ended(client, created.id)
    counts = batch.request_counts
    assert (counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired) == (
        0,
        3,
        0,
        0,
        0,
    )
    assert batch.results_url is not None and batch.results_url.endswith(f"/{batch.id}/results")
    assert batch.ended_at is not None and batch.ended_at >= batch.created_at

    by_id = results(client, batch.id)
    assert set(by_id) == {"doc-1", "doc-2", "doc_3"}
    for line in by_id.values():
        assert line.result.type == "succeeded"
        message = line.result.message
        assert message.id.startswith("msg_sim_") and message.model == MODEL
        assert message.content and message.content[0].type == "text" and message.content[0].text
        assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
        assert message.usage.service_tier == "batch"


def test_processing_time_is_scaled_and_results_wait_for_the_end(
    slow: SimServer, slow_client: anthropic.Anthropic, clock: FakeClock
) -> None:
    batch = slow_client.messages.batches.create(requests=requests_for("a", "b", "c", "d"))
    clock.advance(BATCH_BASE_S + 3 * BATCH_PER_REQUEST_S)  # three of four done
    assert slow_client.messages.batches.retrieve(batch.id).request_counts.processing == 4
    raw = httpx2.get(
        f"{slow.url}/v1/messages/batches/{batch.id}/results", headers={"anthropic-version": "2026-10-21"}
    )
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        slow_client.messages.batches.results(batch.id)
    clock.advance(BATCH_PER_REQUEST_S)
    done = slow_client.messages.batches.retrieve(batch.id)
    assert done.processing_status == "ended" and done.request_counts.succeeded == 4


def test_list_is_newest_first_and_paginated(client: anthropic.Anthropic) -> None:
    made = [client.messages.batches.create(requests=requests_for(f"list-{i}")).id for i in range(3)]
    first = client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2]
    assert first.has_more and first.first_id == made[2] and first.last_id == made[1]
    rest = client.messages.batches.list(limit=2, after_id=made[1])
    assert rest.data[0].id == made[0]
    before = client.messages.batches.list(limit=1, before_id=made[1])
    assert [b.id for b in before.data] == [made[2]]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.list(limit=0)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.list(after_id="msgbatch_nope")


def test_cancel_moves_to_canceling_then_ended_with_the_rest_canceled(
    slow_client: anthropic.Anthropic, clock: FakeClock
) -> None:
    batch = slow_client.messages.batches.create(requests=requests_for("c-1", "c-2", "c-3"))
    clock.advance(BATCH_BASE_S + 1.5 * BATCH_PER_REQUEST_S)  # c-1 done, c-2 and c-3 not
    canceling = slow_client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert canceling.request_counts.processing == 3
    assert slow_client.messages.batches.cancel(batch.id).processing_status == "canceling"
    with pytest.raises(anthropic.BadRequestError):
        slow_client.messages.batches.delete(batch.id)

    clock.advance(CANCEL_DRAIN_S)
    done = slow_client.messages.batches.retrieve(batch.id)
    assert done.processing_status == "ended"
    assert (done.request_counts.succeeded, done.request_counts.canceled) == (1, 2)
    by_id = results(slow_client, batch.id)
    assert {cid: line.result.type for cid, line in by_id.items()} == {
        "c-1": "succeeded",
        "c-2": "canceled",
        "c-3": "canceled",
    }
    with pytest.raises(anthropic.BadRequestError) as info:
        slow_client.messages.batches.cancel(batch.id)
    assert "ended" in info.value.message


def test_delete_only_an_ended_batch_then_it_is_gone(client: anthropic.Anthropic) -> None:
    batch = ended(client, client.messages.batches.create(requests=requests_for("del")).id)
    deleted = client.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.cancel("msgbatch_unknown")


# --- scripted outcomes per custom_id -----------------------------------------------------------------


def test_scripted_errored_and_expired_per_custom_id(
    slow: SimServer, slow_client: anthropic.Anthropic, clock: FakeClock
) -> None:
    slow.state.add_faults(["529"], job_id="err-1")
    slow.state.add_faults(["400"], job_id="err-2")
    slow.state.add_faults(["expired"], job_id="exp-1")
    batch = slow_client.messages.batches.create(requests=requests_for("ok-1", "err-1", "err-2", "exp-1"))
    assert slow.state.scripts()["by_job"] == {}

    clock.advance(BATCH_BASE_S + 10 * BATCH_PER_REQUEST_S)
    # an expired request is only known to be one when the batch reaches its 24 h deadline
    assert slow_client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    clock.advance(BATCH_EXPIRY_S)
    done = slow_client.messages.batches.retrieve(batch.id)
    assert done.processing_status == "ended"
    counts = done.request_counts
    assert (counts.succeeded, counts.errored, counts.expired, counts.canceled) == (1, 2, 1, 0)

    by_id = results(slow_client, batch.id)
    assert by_id["ok-1"].result.type == "succeeded"
    assert by_id["exp-1"].result.type == "expired"
    err_1 = by_id["err-1"].result
    err_2 = by_id["err-2"].result
    assert err_1.type == "errored" and err_2.type == "errored"
    assert err_1.error.type == "error" and err_1.error.error.type == "overloaded_error"
    assert err_2.error.error.type == "invalid_request_error"


def test_the_expired_fault_is_for_batches_only(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="Message Batch"):
        client.messages.create(
            model=MODEL,
            max_tokens=50,
            messages=[{"role": "user", "content": DOC}],
            extra_headers={"x-sim-fault": "expired"},
        )


def test_a_refused_batch_consumes_no_script(sim: SimServer, client: anthropic.Anthropic) -> None:
    sim.state.add_faults(["500"], job_id="kept")
    refused(client, [*requests_for("kept"), *requests_for("kept")])
    assert sim.state.scripts()["by_job"]["kept"] == ["500"]
    batch = ended(client, client.messages.batches.create(requests=requests_for("kept")).id)
    assert batch.request_counts.errored == 1


# --- the limits --------------------------------------------------------------------------------------


def test_duplicate_custom_id_is_refused(client: anthropic.Anthropic) -> None:
    message = refused(client, requests_for("same", "other", "same"))
    assert "requests.2.custom_id" in message and "unique" in message


@pytest.mark.parametrize("custom_id", ["", "has space", "x" * 65, "dot.ted", "ünï"])
def test_bad_custom_id_is_refused(client: anthropic.Anthropic, custom_id: str) -> None:
    assert "requests.0.custom_id" in refused(client, requests_for(custom_id))


def test_a_64_character_custom_id_is_accepted(client: anthropic.Anthropic) -> None:
    assert client.messages.batches.create(requests=requests_for("A_-9" * 16)).request_counts.processing == 1


@pytest.mark.parametrize(
    ("request_params", "where"),
    [
        (params(stream=True), "requests.1.params.stream"),
        (params(max_tokens=0), "requests.1.params.max_tokens"),
        (params(temperature=0.5), "requests.1.params.temperature"),
        (params(model="claude-nope-9"), "requests.1.params.model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": DOC}]}, "requests.1.params.max_tokens"),
    ],
)
def test_an_invalid_params_object_refuses_the_whole_batch(
    client: anthropic.Anthropic, request_params: dict[str, Any], where: str
) -> None:
    message = refused(client, [*requests_for("fine"), {"custom_id": "bad", "params": request_params}])
    assert message.startswith(where), message


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"requests": []}, "requests"),
        ({"requests": [{"custom_id": "x"}]}, "requests.0.params"),
        ({"requests": [{"custom_id": "x", "params": params(), "extra": 1}]}, "requests.0.extra"),
        ({"requests": requests_for("x"), "metadata": {}}, "metadata"),
    ],
)
def test_the_body_shape_is_strict(sim: SimServer, body: dict[str, Any], where: str) -> None:
    raw = httpx2.post(
        f"{sim.url}/v1/messages/batches", json=body, headers={"anthropic-version": "2026-10-21"}
    )
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert raw.json()["error"]["message"].startswith(where)


def test_more_than_100000_requests_are_refused(client: anthropic.Anthropic) -> None:
    assert MAX_BATCH_REQUESTS == 100_000
    tiny = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    many: list[Any] = [{"custom_id": f"r{i}", "params": tiny} for i in range(MAX_BATCH_REQUESTS + 1)]
    assert "at most 100000 requests" in refused(client, many)


def test_the_byte_limit_is_256_mb() -> None:
    # sending 256 MB is too heavy for the suite: the limit itself is what the 413 path checks
    assert MAX_BATCH_BYTES == 256_000_000


def test_batches_need_the_version_header(sim: SimServer) -> None:
    raw = httpx2.post(f"{sim.url}/v1/messages/batches", json={"requests": requests_for("v")})
    assert raw.status_code == 400
    assert "anthropic-version" in raw.json()["error"]["message"]


# --- admin -------------------------------------------------------------------------------------------


def test_admin_lists_batches_and_reset_clears_them(slow: SimServer, slow_client: anthropic.Anthropic) -> None:
    batch = slow_client.messages.batches.create(requests=requests_for("adm-1", "adm-2"))
    listed = httpx2.get(f"{slow.url}/_sim/batches").json()["batches"]
    assert listed == [
        {
            "id": batch.id,
            "processing_status": "in_progress",
            "requests": 2,
            "cancel_initiated": False,
            "custom_ids": ["adm-1", "adm-2"],
        }
    ]
    assert httpx2.post(f"{slow.url}/_sim/reset").status_code == 200
    assert httpx2.get(f"{slow.url}/_sim/batches").json() == {"batches": []}
    with pytest.raises(anthropic.NotFoundError):
        slow_client.messages.batches.retrieve(batch.id)
