"""Tokens streamed back to the producer: ``Job.stream()`` and ``tierq submit --stream``, with real workers."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.helpers import run_tierq
from tierq import JobResult, get_job, submit
from tierq.contract.errors import JobFailedError
from tierq.sim import SimServer

#: long enough that the slow tier's model writes for most of a second at the tests' time scale
LONG_DOC = " ".join(
    f"Section {i} explains how the {('fast', 'standard', 'slow')[i % 3]} tier keeps its promise number {i}."
    for i in range(240)
)

pytestmark = pytest.mark.usefixtures("workers")


def _split(items: list[object]) -> tuple[list[str], dict[str, Any]]:
    """The text chunks, and the result as JSON (as a producer in another language reads it)."""
    *chunks, result = items
    assert all(isinstance(c, str) for c in chunks)
    assert isinstance(result, JobResult)
    return chunks, result.to_json()


def test_chunks_arrive_before_the_job_completes() -> None:
    job = submit(LONG_DOC, urgency="low", stream=True)
    items: list[object] = []
    ready_at_first_chunk = None
    for item in job.stream(timeout=60):
        if not items:
            ready_at_first_chunk = job.ready()
        items.append(item)
    chunks, result = _split(items)
    assert ready_at_first_chunk is False, "the first text arrived while the job was still running"
    assert len(chunks) > 10, "delta by delta, not in one piece"
    assert "".join(chunks) == result["summary"]
    assert result["usage"]["output_tokens"] > 100
    timings = result["timings"]
    assert 0 < timings["producer_ttft_ms"] < timings["total_ms"]
    assert timings["producer_ttft_ms"] >= timings["ttft_ms"], "producer TTFT includes the model's TTFT"


def test_a_late_subscriber_gets_everything() -> None:
    job = submit(LONG_DOC, urgency="critical", stream=True)
    final = job.result(timeout=30).to_json()
    late = get_job(job.id)  # another handle, after the job ended
    chunks, result = _split(list(late.stream(timeout=10)))
    assert "".join(chunks) == final["summary"]
    assert result["job_id"] == job.id
    assert result["timings"]["producer_ttft_ms"] is None, "this handle did not submit the job"


def test_a_job_submitted_without_streaming_yields_its_summary_at_the_end() -> None:
    job = submit(LONG_DOC, urgency="high")
    chunks, result = _split(list(job.stream(timeout=30)))
    assert chunks == [result["summary"]]
    assert result["timings"]["producer_ttft_ms"] >= result["timings"]["total_ms"]


def test_a_failed_streamed_job_ends_the_stream_with_its_error(sim: SimServer) -> None:
    job_id = f"stream-fail-{uuid.uuid4()}"
    sim.state.add_faults(["400"], job_id=job_id)
    job = submit(LONG_DOC, urgency="high", job_id=job_id, stream=True)
    started = time.monotonic()
    with pytest.raises(JobFailedError, match="RequestRejectedError"):
        list(job.stream(timeout=30))
    assert time.monotonic() - started < 10, "the end marker ends the wait, not the timeout"


def test_cli_submit_stream_prints_text_then_figures() -> None:
    done = run_tierq(["submit", "--urgency", "critical", "--stream", LONG_DOC[:3000]])
    assert done.returncode == 0, done.stderr
    assert "Section" in done.stdout
    assert "claude-haiku-4-5" in done.stderr and "first text after" in done.stderr
    bad = run_tierq(["submit", "--stream", "--json", "text"])
    assert bad.returncode == 2 and "--stream" in bad.stderr


def test_a_reader_is_told_when_the_job_starts_over() -> None:
    from tierq import Restarted
    from tierq.core.settings import get_settings
    from tierq.store.clients import backend_redis
    from tierq.store.streams import TokenPublisher, stream_key

    settings = get_settings()
    client = backend_redis(settings)
    assert client is not None
    job_id = f"restart-{uuid.uuid4()}"
    # what a worker that died mid-reply leaves behind: text of a run that will never finish
    TokenPublisher(client, stream_key(job_id, settings.key_prefix), run=0).send("lost words ")
    reader = get_job(job_id).stream(timeout=30)
    assert next(reader) == "lost words "  # a reader already holds the lost run's text...
    submit(LONG_DOC[:4000], urgency="critical", job_id=job_id, stream=True)
    rest = list(reader)
    assert rest[0] == Restarted(run=1), "...so it is told, before the new run's text"
    *chunks, result = rest[1:]
    assert all(isinstance(c, str) for c in chunks) and len(chunks) > 1
    assert isinstance(result, JobResult) and "".join(chunks) == result.summary
    # a reader that comes later reads both runs at once: it gets the finished run's text only
    chunks, late = _split(list(get_job(job_id).stream(timeout=10)))
    assert "".join(chunks) == late["summary"]
