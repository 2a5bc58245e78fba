"""Each transcript's tierq outcome: real workers, the real SDK, the replay server as the API.

Every job of :data:`~tests.contract.conftest.CASES` runs once, all at once (the ``outcomes``
fixture); each test reads how its job ended and which requests the replay server got for it.
"""

from __future__ import annotations

import pytest

from tests.conftest import WorkerProcess
from tests.contract.conftest import DOC, TEXTS, Outcome
from tests.contract.replay import ReplayServer
from tests.helpers import wait_until
from tierq import submit
from tierq.contract import errors
from tierq.sim import SimServer

#: Haiku 4.5, US dollars per million tokens: $1 in, $5 out, cache reads 0.1x input (FINDINGS.md, pricing page)
HAIKU_IN, HAIKU_OUT, HAIKU_CACHE_READ = 1.00, 5.00, 0.10


def _succeeded(outcome: Outcome, retries: int = 0, requests: int = 1) -> dict:
    assert outcome.status == "succeeded", outcome
    assert outcome.result is not None, outcome
    assert outcome.result["retries"] == retries, outcome
    assert len(outcome.requests) == requests, outcome
    return outcome.result


def _failed(outcome: Outcome, error_type: str, requests: int = 1) -> dict:
    assert outcome.error is not None, outcome
    assert "JobFailedError" in outcome.error["classes"], outcome
    assert outcome.error["attributes"].get("error_type") == error_type, outcome
    assert len(outcome.requests) == requests, outcome
    return outcome.error


@pytest.mark.parametrize("name", ["ok", "padded_json", "pings", "unknown_event", "unknown_block"])
def test_reply_becomes_the_summary(outcomes: dict[str, Outcome], replay: ReplayServer, name: str) -> None:
    result = _succeeded(outcomes[name])
    assert result["summary"] == TEXTS[name]
    assert result["stop_reason"] == "end_turn"
    assert result["request_id"] == replay.transcripts[name].header("request-id")


def test_thinking_is_not_the_summary_but_is_counted(outcomes: dict[str, Outcome]) -> None:
    result = _succeeded(outcomes["thinking_then_text"])
    assert result["summary"] == TEXTS["thinking_then_text"]
    assert result["usage"]["output_tokens"] == 87
    assert result["usage"]["thinking_tokens"] == 61


def test_refusal_is_refused_not_retried(outcomes: dict[str, Outcome], contract_worker: WorkerProcess) -> None:
    outcome = outcomes["refusal"]
    refused = getattr(errors, "JobRefusedError", None)
    assert refused is not None and issubclass(refused, errors.JobFailedError)
    assert outcome.status == "refused", outcome
    assert outcome.error is not None and outcome.error["class"] == "JobRefusedError", outcome
    assert "JobFailedError" in outcome.error["classes"]
    assert outcome.error["attributes"].get("category") == "cyber", outcome
    assert len(outcome.requests) == 1, outcome
    assert len(contract_worker.wait_for(outcome.job_id, "summarize.refused", timeout=5)) == 1
    assert contract_worker.events_for(outcome.job_id, "summarize.retrying") == []


def test_cache_hit_is_costed_at_the_cache_read_price(outcomes: dict[str, Outcome]) -> None:
    result = _succeeded(outcomes["cache_hit"])
    assert result["model"] == "claude-haiku-4-5"
    assert result["usage"]["input_tokens"] == 50
    assert result["usage"]["cache_read_input_tokens"] == 4000
    assert result["usage"]["output_tokens"] == 60
    by_hand = (50 * HAIKU_IN + 4000 * HAIKU_IN * HAIKU_CACHE_READ + 60 * HAIKU_OUT) / 1_000_000
    assert result["cost_usd"] == pytest.approx(by_hand, abs=1e-9)


def test_max_tokens_stop_is_marked_truncated(outcomes: dict[str, Outcome]) -> None:
    result = _succeeded(outcomes["max_tokens_stop"])
    assert result["stop_reason"] == "max_tokens"
    assert result["truncated"] is True
    assert result["summary"] == TEXTS["max_tokens_stop"]


def test_a_whole_reply_is_not_truncated(outcomes: dict[str, Outcome]) -> None:
    assert _succeeded(outcomes["ok"])["truncated"] is False


@pytest.mark.parametrize("name", ["error_before_text", "error_after_text", "dropped_connection", "http_529"])
def test_fast_tier_retries_a_broken_reply_once(outcomes: dict[str, Outcome], name: str) -> None:
    """An overload before or after the first text, or a cut stream: the fast tier starts over."""
    result = _succeeded(outcomes[name], retries=1, requests=2)
    # the new run's text only, never the broken reply's text in front of it
    assert result["summary"] == TEXTS["ok"]


def test_standard_tier_does_not_retry_after_text(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["error_after_text_standard"]
    _failed(outcome, "StreamInterruptedError")
    assert outcome.status == "failed"


def test_429_waits_what_retry_after_says(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["http_429"]
    _succeeded(outcome, retries=1, requests=2)
    first, second = outcome.requests
    assert second.at - first.at >= 0.9


def test_spend_limit_is_not_retried_and_dead_lettered(
    outcomes: dict[str, Outcome], replay: ReplayServer
) -> None:
    outcome = outcomes["spend_limit"]
    _failed(outcome, "SpendLimitError")
    assert outcome.status == "failed"
    letter = outcome.dead_letter
    assert letter is not None, outcome
    assert letter["reason"] == "spend_limit"
    kept = " ".join(str(v) for v in letter.values())
    assert "rate_limit_error" in kept
    assert "crossed the monthly API usage threshold" in kept


def test_404_fails_with_the_apis_error(outcomes: dict[str, Outcome]) -> None:
    error = _failed(outcomes["http_404"], "RequestRejectedError")
    assert "not_found_error" in error["message"]
    assert "model: claude-nope" in error["message"]


def test_413_fails_without_retry(outcomes: dict[str, Outcome]) -> None:
    _failed(outcomes["http_413"], "RequestRejectedError")


def test_requests_are_ones_the_api_accepts(outcomes: dict[str, Outcome]) -> None:
    """What the workers sent: no sampling parameters (rejected under 2026-10-21), the tier's model."""
    for outcome in outcomes.values():
        for request in outcome.requests:
            assert request.headers.get("anthropic-version") == "2026-10-21"
            assert request.headers.get("x-tierq-job-id") == outcome.job_id
            body = request.body
            assert isinstance(body, dict) and body.get("stream") is True
            assert not {"temperature", "top_p", "top_k"} & set(body), (outcome.case.name, body)
            if outcome.case.urgency == "high":
                assert body["model"] == "claude-haiku-4-5" and body["max_tokens"] <= 256


def test_contract_and_session_workers_never_share_jobs(
    outcomes: dict[str, Outcome], replay: ReplayServer, sim: SimServer, workers: dict[str, WorkerProcess]
) -> None:
    for outcome in outcomes.values():
        assert outcome.requests, f"{outcome.job_id} never reached the replay server"
        assert sim.state.request_count(outcome.job_id) == 0, f"{outcome.job_id} reached the simulator"
    session_job = submit(DOC, urgency="high")  # the session's prefix: the session's workers
    wait_until(lambda: sim.state.request_count(session_job.id), 20, "the session's job at the simulator")
    assert replay.requests(session_job.id) == []
