"""How a job ends when the API answers something other than a clean summary, with real workers.

Each case scripts the simulator's answer for one job (``SimState.add_faults``) and checks what a
producer, an operator's dead-letter listing and the worker's canonical log line see.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import WorkerProcess
from tests.helpers import wait_until
from tierq import JobFailedError, JobRefusedError, JobResult, Restarted, submit
from tierq.core.settings import get_settings
from tierq.sim import SimServer
from tierq.sim.messages import REFUSAL_DETAILS
from tierq.store.deadletter import DeadLetterStore

DOC = " ".join(f"Point {i}: the summary must say what the API really answered, and why." for i in range(30))

pytestmark = pytest.mark.usefixtures("workers")


def _store() -> DeadLetterStore:
    store = DeadLetterStore.from_settings(get_settings())
    assert store is not None
    return store


def _line(worker: WorkerProcess, job_id: str, event: str) -> dict[str, Any]:
    lines = wait_until(lambda: worker.events_for(job_id, event), timeout=10, what=f"{event} of {job_id}")
    assert len(lines) == 1, lines
    return lines[0]


def test_a_refusal_ends_refused_not_retried_and_not_dead_lettered(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"refusal-{uuid.uuid4()}"
    sim.state.add_faults(["refusal"], job_id=job_id)
    job = submit(DOC, urgency="critical", job_id=job_id)
    with pytest.raises(JobRefusedError) as info:
        job.result(timeout=30)
    assert info.value.error_type == "RefusedError"
    assert info.value.category == REFUSAL_DETAILS["category"], "the API's category reaches the producer"
    assert job.status() == "refused"
    assert sim.state.request_count(job_id) == 1, "a refusal is not retried"
    line = _line(workers["fast"], job_id, "summarize.refused")
    assert line["tier"] == "fast" and line["category"] == info.value.category
    assert workers["fast"].events_for(job_id, "summarize.failed") == []
    assert _store().get(job_id) is None


def test_a_spend_limit_is_never_retried_and_keeps_the_apis_words(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"spend-{uuid.uuid4()}"
    sim.state.add_faults(["spend_limit"], job_id=job_id)
    job = submit(DOC, urgency="high", job_id=job_id)
    with pytest.raises(JobFailedError) as info:
        job.result(timeout=30)
    assert info.value.error_type == "SpendLimitError"
    assert "rate_limit_error" in str(info.value), "the API's error type reaches the producer"
    assert sim.state.request_count(job_id) == 1
    letter = wait_until(lambda: _store().get(job_id), timeout=10, what="the dead letter")
    assert letter.reason == "spend_limit" and letter.error_type == "SpendLimitError"
    assert "HTTP 429 rate_limit_error: " in letter.error and len(letter.error) < 500
    line = _line(workers["fast"], job_id, "summarize.failed")
    assert line["reason"] == "spend_limit" and line["status_code"] == 429


def test_a_max_tokens_stop_is_marked_truncated(sim: SimServer) -> None:
    result = submit(DOC, urgency="critical", max_tokens=5).result(timeout=30)
    assert result.stop_reason == "max_tokens" and result.truncated is True
    assert result.to_json()["truncated"] is True, "on the wire too"
    whole = submit(DOC, urgency="critical").result(timeout=30)
    assert whole.truncated is (whole.stop_reason == "max_tokens")


def test_the_fast_tier_retries_a_stream_that_broke_after_text(
    sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    job_id = f"broken-fast-{uuid.uuid4()}"
    sim.state.add_faults(["midstream:2"], job_id=job_id)
    items = list(submit(DOC, urgency="critical", job_id=job_id, stream=True).stream(timeout=30))
    result = items[-1]
    assert isinstance(result, JobResult) and result.retries == 1
    assert sim.state.request_count(job_id) == 2
    restarted = [i for i, item in enumerate(items) if isinstance(item, Restarted)]
    if restarted:  # a reader that saw the broken run's text is told before the new run's
        after = "".join(item for item in items[restarted[-1] + 1 : -1] if isinstance(item, str))
        assert after == result.summary
    retry = _line(workers["fast"], job_id, "summarize.retrying")
    assert retry["error_type"] == "StreamInterruptedError"


def test_the_standard_tier_does_not_retry_a_stream_that_broke_after_text(sim: SimServer) -> None:
    job_id = f"broken-standard-{uuid.uuid4()}"
    sim.state.add_faults(["midstream:2"], job_id=job_id)
    with pytest.raises(JobFailedError) as info:
        submit(DOC, urgency="normal", job_id=job_id).result(timeout=60)
    assert info.value.error_type == "StreamInterruptedError"
    assert sim.state.request_count(job_id) == 1


def test_a_thinking_models_summary_is_its_text_and_its_usage_is_whole(sim: SimServer) -> None:
    result = submit(DOC, urgency="normal").result(timeout=60)
    usage = result.usage
    assert result.model == "claude-sonnet-5-5"
    assert usage.thinking_tokens is not None and 0 < usage.thinking_tokens < usage.output_tokens
    assert result.summary and result.cost_usd and result.cost_usd > 0
    assert usage.cache_creation_input_tokens == usage.cache_read_input_tokens == 0
