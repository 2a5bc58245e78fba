"""The producer side of the contract tests, run as its own process so that it reads its own settings.

The producer reads ``TIERQ_KEY_PREFIX`` and the rest once per process (``get_settings`` is cached),
so the contract tests run it with the contract workers' environment instead of reconfiguring the
test process::

    python -m tests.contract.client ping NODE [NODE ...]   # exit 0 once every node answers
    python -m tests.contract.client run < jobs.json         # submit, wait, print outcomes as JSON

``run`` reads ``[{"job_id", "urgency", "text", "timeout"}, ...]``, submits every job first (so that
they run concurrently), then waits for each and prints ``{job_id: outcome}``; an outcome is
``{"status", "result", "error", "dead_letter"}``, ``error`` being the exception ``Job.result``
raised: its class, the names of its classes, ``str()`` and its public attributes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

from tests.helpers import wait_until

#: seconds a failed job's dead letter is waited for after its result
DEAD_LETTER_WAIT_S = 5.0
#: seconds ``ping`` waits for the workers
PING_TIMEOUT_S = 60.0


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "class": type(exc).__name__,
        "classes": [cls.__name__ for cls in type(exc).__mro__],
        "message": str(exc),
        "attributes": {k: v for k, v in vars(exc).items() if not k.startswith("_") and _jsonable(v)},
    }


def _dead_letter(job_id: str, wait_s: float) -> dict[str, Any] | None:
    from tierq.core.settings import get_settings
    from tierq.store.deadletter import DeadLetterStore

    store = DeadLetterStore.from_settings(get_settings())
    if store is None:
        return None
    try:
        letter = wait_until(lambda: store.get(job_id), wait_s, f"the dead letter of {job_id}")
    except AssertionError:  # none: the outcome says so
        return None
    # the document's text: not needed, and not for logs
    fields: dict[str, Any] = letter.model_dump(mode="json", exclude={"payload"})
    return fields


def run(specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Submit every job, then wait for each; the outcomes by job id."""
    from tierq import submit

    jobs = [(spec, submit(spec["text"], urgency=spec["urgency"], job_id=spec["job_id"])) for spec in specs]
    outcomes: dict[str, dict[str, Any]] = {}
    start = time.monotonic()
    for spec, job in jobs:
        outcome: dict[str, Any] = {"result": None, "error": None, "dead_letter": None}
        try:
            left = max(0.1, spec["timeout"] - (time.monotonic() - start))
            outcome["result"] = job.result(timeout=left).to_json()
        except Exception as exc:
            outcome["error"] = _error(exc)
            outcome["dead_letter"] = _dead_letter(job.id, DEAD_LETTER_WAIT_S)
        outcome["status"] = job.status()
        outcomes[job.id] = outcome
    return outcomes


def ping(nodes: list[str], timeout: float = PING_TIMEOUT_S) -> bool:
    """Whether every node answered a ping within ``timeout`` seconds."""
    from tierq.celery.app import app

    def answered() -> bool:
        replies = app.control.ping(destination=nodes, timeout=0.5)  # its 0.5 s paces the tries
        return set(nodes) <= {name for reply in replies for name in reply}

    with contextlib.suppress(AssertionError):
        return wait_until(answered, timeout, f"{nodes} to answer a ping", interval=0)
    return False


def main(argv: list[str]) -> int:
    if argv[:1] == ["ping"]:
        return 0 if ping(argv[1:]) else 1
    if argv[:1] == ["run"]:
        sys.stdout.write(json.dumps(run(json.load(sys.stdin))) + "\n")
        return 0
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
