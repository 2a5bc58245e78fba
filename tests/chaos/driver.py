"""The producer side of the chaos scenarios, in a process of its own (``python -m tests.chaos.driver``).

tierq reads its settings once per process and the test process belongs to the main test session,
so the chaos suite submits, polls and publishes from here, with the chaos environment
(``TIERQ_BROKER_URL`` of the chaos Redis, its key prefix and tiers file). One JSON object a line on
stdin (``{"op": ..., ...}``), one answer a line on stdout (``{"value": ...}`` or
``{"driver_error": ...}``). Nothing here logs a document.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from typing import Any

import structlog

from tierq import get_job, submit
from tierq.contract.errors import (
    BrokerUnavailableError,
    JobExpiredError,
    JobFailedError,
    JobTimeoutError,
    TierqError,
)


def _submit(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for spec in jobs:
        started = time.monotonic()
        answer: dict[str, Any] = {
            "job_id": spec.get("job_id"),
            "ok": False,
            "error_type": None,
            "field": None,
        }
        try:
            job = submit(
                spec["text"],
                urgency=spec["urgency"],
                job_id=spec.get("job_id"),
                max_tokens=spec.get("max_tokens"),
                deadline_s=spec.get("deadline_s"),
                stream=bool(spec.get("stream", False)),
            )
            answer.update(job_id=job.id, ok=True, duplicate=job.duplicate)
        except TierqError as exc:
            answer.update(error_type=type(exc).__name__, field=getattr(exc, "field", None))
        answer["elapsed_s"] = round(time.monotonic() - started, 3)
        out.append(answer)
    return out


def _status(ids: list[str]) -> dict[str, str]:
    out = {}
    for job_id in ids:
        try:
            out[job_id] = get_job(job_id).status()
        except BrokerUnavailableError:
            out[job_id] = "unreachable"
    return out


def _outcome(ids: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for job_id in ids:
        job = get_job(job_id)
        try:
            result = job.result(timeout=1.0).to_json()
            out[job_id] = {
                "status": "succeeded",
                "model": result["model"],
                "retries": result["retries"],
                "fallback": result.get("fallback"),
                "request_id": result["request_id"],
                "output_tokens": result["usage"]["output_tokens"],
            }
        except JobExpiredError as exc:
            out[job_id] = {"status": "expired", "error_type": exc.error_type, "job_status": job.status()}
        except JobFailedError as exc:
            out[job_id] = {"status": "failed", "error_type": exc.error_type, "job_status": job.status()}
        except (JobTimeoutError, BrokerUnavailableError):
            out[job_id] = {"status": job.status(), "error_type": None}
    return out


def _publish(body_b64: str, content_type: str, headers: dict[str, Any], queue: str) -> None:
    from tierq.celery.app import app

    with app.connection_for_write() as conn:
        conn.Producer().publish(
            base64.b64decode(body_b64),
            exchange="tierq",
            routing_key=queue,
            content_type=content_type,
            content_encoding="utf-8",
            headers=headers,
        )


def _dead_letters(ids: list[str]) -> dict[str, dict[str, Any] | None]:
    from tierq.core.settings import get_settings
    from tierq.store.deadletter import DeadLetterStore

    store = DeadLetterStore.from_settings(get_settings())
    if store is None:
        raise RuntimeError("no Redis result backend")
    out: dict[str, dict[str, Any] | None] = {}
    for job_id in ids:
        letter = store.get(job_id)
        out[job_id] = None if letter is None else letter.summary()
    return out


def _handle(request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "hello":
        return "hello"
    if op == "submit":
        return _submit(request["jobs"])
    if op == "status":
        return _status(request["ids"])
    if op == "outcome":
        return _outcome(request["ids"])
    if op == "dlq":
        return _dead_letters(request["ids"])
    if op == "publish":
        _publish(request["body_b64"], request["content_type"], request["headers"], request["queue"])
        return "published"
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    # stdout carries the answers, one JSON line each: tierq's log lines (a refused submit logs one)
    # go to stderr, the driver's log file
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = {"value": _handle(json.loads(line))}
        except Exception as exc:
            reply = {"driver_error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
