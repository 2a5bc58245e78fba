"""The language-neutral contract: the committed JSON Schemas are what the models generate, and real
messages and results validate against them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from tests.helpers import ROOT, run_tierq
from tierq.contract.job import (
    CONTEXT_HEADER,
    DEADLINE_HEADER,
    ENQUEUED_AT_HEADER,
    FIRST_STARTED_AT_HEADER,
    LIMITER_WAIT_S_HEADER,
    LIMITER_WAITS_HEADER,
    OVERLOADS_HEADER,
    STREAM_HEADER,
    TIER_HEADER,
    build_job,
)
from tierq.contract.message import TaskHeaders
from tierq.contract.result import JobResult, Timings, Usage
from tierq.contract.schemas import rendered
from tierq.contract.tiers import load_tier_table

SCHEMAS = ROOT / "docs" / "schemas" / "v1"


def _load(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return schema


def _validator(name: str) -> jsonschema.Draft202012Validator:
    registry: Registry[Any] = Registry()
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text(encoding="utf-8"))
        registry = registry.with_resource(schema["$id"], Resource.from_contents(schema))
    return jsonschema.Draft202012Validator(_load(name), registry=registry)


def test_committed_schemas_are_what_the_models_generate() -> None:
    committed = {path.name: path.read_text(encoding="utf-8") for path in SCHEMAS.glob("*.json")}
    assert committed == rendered(), "run `tierq schemas` and commit docs/schemas/v1"
    done = run_tierq(["schemas", "--check", "--out", str(SCHEMAS)])
    assert done.returncode == 0, done.stderr


def test_schemas_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    for name, text in rendered().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "job.json").write_text("{}\n", encoding="utf-8")
    done = run_tierq(["schemas", "--check", "--out", str(tmp_path)])
    assert done.returncode == 1 and "job.json" in done.stderr


def test_header_aliases_are_the_producer_header_names() -> None:
    aliases = {field.alias for field in TaskHeaders.model_fields.values() if field.alias}
    assert aliases == {
        ENQUEUED_AT_HEADER,
        DEADLINE_HEADER,
        FIRST_STARTED_AT_HEADER,
        OVERLOADS_HEADER,
        LIMITER_WAITS_HEADER,
        LIMITER_WAIT_S_HEADER,
        TIER_HEADER,
        STREAM_HEADER,
        CONTEXT_HEADER,
    }


def test_a_producer_job_and_body_and_result_validate() -> None:
    spec, _ = build_job(load_tier_table(None), "a document", "high", None, 64, "j-1", {"k": [1, {"x": 2}]})
    job = spec.model_dump(mode="json", exclude_none=True)
    _validator("job.json").validate(job)
    _validator("body.json").validate([[], {"job": job}, {}])
    with pytest.raises(jsonschema.ValidationError):
        _validator("body.json").validate([["positional"], {"job": job}, {}])
    with pytest.raises(jsonschema.ValidationError):
        _validator("job.json").validate({**job, "colour": "red"})
    headers = {"id": "j-1", "task": "tierq.summarize", ENQUEUED_AT_HEADER: 1.5, DEADLINE_HEADER: 16.5}
    _validator("headers.json").validate(headers)
    result = JobResult(
        job_id="j-1",
        tier="fast",
        model="claude-haiku-4-5",
        stop_reason="end_turn",
        usage=Usage(input_tokens=10, output_tokens=5),
        timings=Timings(
            queue_wait_ms=1.0,
            prep_ms=0.5,
            ttft_ms=100.0,
            llm_ms=200.0,
            total_ms=210.0,
            output_tokens_per_s=50.0,
        ),
        cost_usd=0.0001,
        retries=0,
        request_id="req_1",
        summary="A summary.",
    )
    _validator("result.json").validate(result.to_json())
    _validator("status.json").validate("cancelled")
