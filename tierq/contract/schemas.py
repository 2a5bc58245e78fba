"""JSON Schemas of the contract, generated from the typed models (``docs/schemas/v1/``).

``tierq schemas`` writes them; a test fails when the committed files differ from what the models
generate, so the documents other languages read cannot drift from the code that checks messages.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, TypeAdapter

from tierq.contract.job import JobSpec
from tierq.contract.message import Embed, Kwargs, TaskHeaders
from tierq.contract.result import STATUSES, JobResult

__all__ = ["SCHEMA_VERSION", "STATUSES", "schemas"]

#: bumped when a change would refuse a message or a reader that the previous version accepted
SCHEMA_VERSION = "v1"
_BASE = f"https://github.com/tierq/tierq/blob/main/docs/schemas/{SCHEMA_VERSION}"


def _schema(name: str, title: str, model: type[BaseModel] | TypeAdapter[Any], mode: str) -> dict[str, Any]:
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    schema: dict[str, Any] = adapter.json_schema(
        mode="validation" if mode == "validation" else "serialization"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{_BASE}/{name}",
        **schema,
        "title": title,
    }


def schemas() -> dict[str, dict[str, Any]]:
    """Every schema by file name."""
    headers = _schema("headers.json", "tierq task message headers", TaskHeaders, "validation")
    headers["description"] = (
        "Headers of a Celery protocol 2 message for tierq.summarize. `id` and `task` are required; "
        "the tierq_* headers are optional (a job without them gets its tier's deadline, and its "
        "wait in the queue is unknown). Other headers are allowed within the bounds."
    )
    items = TypeAdapter(tuple[tuple[()], Kwargs, Embed | None])
    body = _schema("body.json", "tierq task message body", items, "validation")
    body["$defs"]["Kwargs"]["properties"]["job"] = {"$ref": "job.json"}
    body["$defs"].pop("JsonValue", None)
    body["description"] = (
        'The JSON body of a tierq.summarize message: [[], {"job": <job.json>}, {} or null]. '
        "No positional arguments, one keyword argument, no linked tasks."
    )
    return {
        "job.json": _schema("job.json", "tierq job", JobSpec, "validation"),
        "headers.json": headers,
        "body.json": body,
        "result.json": _schema("result.json", "tierq job result", JobResult, "serialization"),
        "status.json": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{_BASE}/status.json",
            "title": "tierq job status",
            "enum": list(STATUSES),
        },
    }


def rendered() -> dict[str, str]:
    """The schema files' text, as committed."""
    return {name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in schemas().items()}
