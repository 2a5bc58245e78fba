"""The model misbehaves: 429 with retry-after, a 529 storm, 500, a stalled stream past the deadline,
errors mid-stream before and after the first token, a 400; every job ends in a clear state."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.conftest import Chaos, Pool
from tests.chaos.harness import Producer, document, new_id, new_tag, tally

#: a deployment of its own, or processes killed and restarted: in `make test`, not `make check`
pytestmark = pytest.mark.slow

#: case → (simulator faults for the job, submit options, expected status, expected error type)
CASES: dict[str, tuple[list[str], dict[str, Any], str, str | None]] = {
    "500": (["500"], {}, "succeeded", None),
    "529x2": (["529", "529"], {}, "succeeded", None),
    "midstream0": (["midstream:0"], {}, "succeeded", None),
    # the fast tier retries a reply that broke after its first text (``retry_after_text``)
    "midstream3": (["midstream:3"], {}, "succeeded", None),
    "stall": (["stall:6"], {"deadline_s": 2}, "expired", "DeadlineExceededError"),
    "400": (["400"], {}, "failed", "RequestRejectedError"),
    # last: a 429 holds every call of the model for its retry-after (the shared rate limit), which
    # would leave the 2-second job above no time to run
    "429": (["429:1"], {}, "succeeded", None),
}
STORM_JOBS = 12
STORM_RATE = 0.3


def _job(chaos: Chaos, producer: Producer, kind: str, **kwargs: Any) -> str:
    tag = new_tag()
    text = document(tag, 40)
    chaos.secrets += [tag, text[:200]]
    submitted = producer.submit(text, "critical", job_id=new_id(kind), **kwargs)
    assert submitted["ok"], submitted
    return str(submitted["job_id"])


@pytest.mark.timeout(120)
def test_every_faulty_job_ends_succeeded_or_in_a_clear_failure(
    chaos: Chaos, pool: Pool, producer: Producer
) -> None:
    worker = pool.start("fast").wait_ready()
    counter = chaos.sim.counter
    ids: dict[str, str] = {}
    for case, (faults, options, _, _) in CASES.items():
        tag = new_tag()
        ids[case] = job_id = new_id(case)
        chaos.sim.state.add_faults(faults, job_id=job_id)
        text = document(tag, 40)
        chaos.secrets += [tag, text[:200]]
        submitted = producer.submit(text, "critical", job_id=job_id, **options)
        assert submitted["ok"], submitted
    producer.wait_ended(ids.values(), timeout=40)
    scripted = producer.outcomes(ids.values())

    # the storm: every call without a scripted fault is overloaded with probability STORM_RATE
    chaos.sim.state.set_rates({"529": STORM_RATE})
    try:
        storm = [_job(chaos, producer, "storm") for _ in range(STORM_JOBS)]
        producer.wait_ended(storm, timeout=60)
    finally:
        chaos.sim.state.set_rates({})
    stormed = producer.outcomes(storm)
    letters = producer.dead_letters([*ids.values(), *storm])

    outcomes = {**scripted, **stormed}
    storm_ok = [j for j in storm if stormed[j]["status"] == "succeeded"]
    on_fallback = [j for j in storm_ok if stormed[j]["fallback"]]
    storm_failed = sorted({str(stormed[j].get("error_type")) for j in storm if j not in storm_ok})
    storm_calls = sum(counter.requests(j) for j in storm)
    storm_completed = [j for j in storm for _ in range(counter.completed(j))]
    ended = ", ".join(f"{case}={scripted[job_id]['status']}" for case, job_id in ids.items())
    row = chaos.record(
        tally(
            "6 simulator faults + 529 storm",
            outcomes,
            counter,
            [
                f"scripted: {ended}",
                f"storm: {len(storm_ok)}/{STORM_JOBS} succeeded ({len(on_fallback)} on the fallback model) "
                f"after {storm_calls} calls ({storm_calls - len(storm_completed)} overloaded), "
                f"failed as {storm_failed or 'none'}",
            ],
        )
    )
    assert row.lost == 0 and row.duplicates == 0, outcomes
    for case, (_, _, status, error_type) in CASES.items():
        outcome = scripted[ids[case]]
        assert outcome["status"] == status, (case, outcome)
        if error_type is not None:
            assert outcome["error_type"] == error_type, (case, outcome)
    for job_id in storm:
        assert stormed[job_id]["status"] in ("succeeded", "failed"), stormed[job_id]
        if stormed[job_id]["status"] == "failed":
            assert stormed[job_id]["error_type"] == "OverloadedError"
            assert letters[job_id] is not None

    # 429 waits what retry-after says; 5xx and an error before the first token are retried once
    [retrying] = worker.events_for(ids["429"], "summarize.retrying")
    assert retrying["delay_s"] == 1.0 and retrying["error_type"] == "RateLimitedError"
    # and on the fast tier, so is a stream that broke after its first text (retry_after_text)
    for case in ("429", "500", "midstream0", "midstream3"):
        assert scripted[ids[case]]["retries"] == 1 and counter.requests(ids[case]) == 2, case
    # the fast tier switches to its fallback model after two overloads
    assert scripted[ids["529x2"]]["model"] == "claude-sonnet-4-6"
    assert scripted[ids["529x2"]]["fallback"] == {"from": "claude-haiku-4-5", "after_overloads": 2}
    # a 400 is never retried
    assert counter.requests(ids["400"]) == 1 and letters[ids["400"]] is not None
    # the stalled stream was cut at the deadline: Job.status() says expired
    assert scripted[ids["stall"]]["job_status"] == "expired" and counter.requests(ids["stall"]) == 1
    assert all(counter.completed(j) <= 1 for j in outcomes)
