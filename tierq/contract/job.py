"""What a job is before it runs: the message body's schema and the producer's input checks.

Kept apart from ``tierq.runtime.jobs`` so the producer imports neither the SDK nor Celery's worker side.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from tierq.contract.errors import InvalidJobError
from tierq.contract.tiers import Tier, TierTable

__all__ = [
    "CONTEXT_HEADER",
    "DEADLINE_HEADER",
    "ENQUEUED_AT_HEADER",
    "FIRST_STARTED_AT_HEADER",
    "LIMITER_WAITS_HEADER",
    "LIMITER_WAIT_S_HEADER",
    "MAX_INSTRUCTIONS_CHARS",
    "MAX_METADATA_BYTES",
    "OVERLOADS_HEADER",
    "STREAM_HEADER",
    "SUMMARIZE_TASK",
    "TIER_HEADER",
    "JobSpec",
    "build_job",
    "build_prompt",
    "carried_context",
    "check_caps",
    "check_deadline",
    "check_job",
    "kwargs_repr",
    "parse_job",
    "prompt_parts",
    "resolve_tier",
]

#: the Celery task's name: what producers in any language put in a message's ``task`` header; its
#: only argument is ``kwargs={"job": <JobSpec as JSON>}``
SUMMARIZE_TASK = "tierq.summarize"

#: message headers set by the producer (wall-clock ``time.time()`` seconds)
ENQUEUED_AT_HEADER = "tierq_enqueued_at"
DEADLINE_HEADER = "tierq_deadline"
#: set on a retried message, so queue wait stays the first attempt's
FIRST_STARTED_AT_HEADER = "tierq_first_started_at"
#: set on a retried message: how many attempts so far ended overloaded (529)
OVERLOADS_HEADER = "tierq_overloads"
#: set on a message sent back to its queue to wait for rate-limit capacity: how many times so far
#: (those sends spend none of the tier's retries), and the seconds waited for capacity in all
LIMITER_WAITS_HEADER = "tierq_limiter_waits"
LIMITER_WAIT_S_HEADER = "tierq_limiter_wait_s"
#: the job's tier and whether it streams, for code that sees the headers but not the body (expiry)
TIER_HEADER = "tierq_tier"
STREAM_HEADER = "tierq_stream"
#: the producer's structlog context (request id, caller...), bound in the worker's log lines
CONTEXT_HEADER = "tierq_context"
#: how much of it travels: keys, and characters per value
MAX_CONTEXT_KEYS = 16
MAX_CONTEXT_VALUE_CHARS = 256

#: limits on producer input that do not depend on the tier
MAX_INSTRUCTIONS_CHARS = 4_000
MAX_METADATA_BYTES = 16_384
#: levels of objects and arrays within ``metadata``
MAX_METADATA_DEPTH = 8
#: what a job id is: also the Celery task id, and part of Redis keys
JOB_ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
MAX_JOB_ID_CHARS = 128


class JobSpec(BaseModel):
    """The job as it travels in the message body (``kwargs["job"]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(min_length=1, max_length=MAX_JOB_ID_CHARS, pattern=JOB_ID_PATTERN)
    tier: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1)
    instructions: str | None = Field(default=None, max_length=MAX_INSTRUCTIONS_CHARS)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, JsonValue] | None = None
    #: publish text deltas as they arrive, for ``Job.stream()``
    stream: bool = False
    #: who sent the job (the HTTP API's token name, or what a producer says); for logs and fairness
    producer_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")

    def fingerprint(self) -> str:
        """What the job asks for, hashed: equal for two submits of the same request under one id.

        Covers the text, tier, instructions, ``max_tokens``, metadata and producer; not whether
        the job streams (a delivery choice, not a different request).
        """
        asked = self.model_dump(mode="json", exclude={"job_id", "stream"}, exclude_none=True)
        encoded = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _invalid(field: str, message: str) -> InvalidJobError:
    return InvalidJobError(f"{field}: {message}", field=field)


def build_job(
    tiers: TierTable,
    text: object,
    urgency: object,
    instructions: object,
    max_tokens: object,
    job_id: str,
    metadata: object,
    stream: bool = False,
    producer_id: str | None = None,
) -> tuple[JobSpec, Tier]:
    """Check producer input against the tier table; raise InvalidJobError naming the field."""
    if not isinstance(urgency, str) or urgency not in tiers.urgencies:
        raise _invalid("urgency", f"{urgency!r} is not one of {', '.join(tiers.urgencies)}")
    tier = tiers.for_urgency(urgency)
    if not isinstance(text, str) or not text.strip():
        raise _invalid("text", "is empty; give the document to summarize")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("instructions", "must be a string")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _invalid("max_tokens", f"must be a positive integer, not {max_tokens!r}")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata)
    ):
        raise _invalid("metadata", "must be a JSON object with string keys")
    if metadata is not None:
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _invalid("metadata", f"is not JSON-serializable: {exc}") from None
        except RecursionError:
            raise _invalid("metadata", f"nests deeper than {MAX_METADATA_DEPTH} levels") from None
    try:
        spec = JobSpec(
            job_id=job_id,
            tier=tier.name,
            text=text,
            instructions=instructions,
            max_tokens=max_tokens,
            metadata=metadata,
            stream=stream,
            producer_id=producer_id,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "job"
        raise _invalid(field, error["msg"]) from None
    check_caps(spec, tier)
    return spec, tier


def check_caps(spec: JobSpec, tier: Tier) -> None:
    """The tier's caps and the size limits, for producer input and every delivery alike."""
    if len(spec.text) > tier.max_input_chars:
        raise _invalid(
            "text",
            f"is {len(spec.text)} characters; the {tier.name} tier takes at most {tier.max_input_chars}",
        )
    if spec.max_tokens is not None and spec.max_tokens > tier.max_tokens:
        raise _invalid(
            "max_tokens", f"{spec.max_tokens} is above the {tier.name} tier's cap of {tier.max_tokens}"
        )
    if spec.metadata is not None:
        if _depth(spec.metadata) > MAX_METADATA_DEPTH:
            raise _invalid("metadata", f"nests deeper than {MAX_METADATA_DEPTH} levels")
        encoded = json.dumps(spec.metadata, allow_nan=False, separators=(",", ":"))
        if len(encoded.encode()) > MAX_METADATA_BYTES:
            raise _invalid("metadata", f"is larger than {MAX_METADATA_BYTES} bytes as JSON")


def _depth(value: object, level: int = 1) -> int:
    """Levels of objects and arrays, counted no deeper than one past the limit."""
    if level > MAX_METADATA_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max(
        (_depth(child, level + 1) for child in children if isinstance(child, dict | list)), default=level
    )


def check_job(job: object, tiers: TierTable, queue: str | None) -> tuple[JobSpec, Tier]:
    """A delivered job, checked where it runs: schema, known tier, the queue it came from, the tier's caps.

    ``queue`` is the routing key it was delivered with; a job naming another tier than its queue's
    is refused, so a sender cannot run a slow tier's model on a fast tier's pool (or the reverse).
    """
    spec = parse_job(job)
    tier = resolve_tier(spec, tiers)
    if queue is not None and queue != tier.queue:
        raise _invalid("tier", f"{spec.tier!r} is not the tier of queue {queue!r}; send it to {tier.queue!r}")
    check_caps(spec, tier)
    return spec, tier


def carried_context(context: dict[str, object]) -> dict[str, str | int | float | bool]:
    """The part of a structlog context that travels with a job: scalar values, bounded in size."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in context.items():
        if len(out) >= MAX_CONTEXT_KEYS:
            break
        if isinstance(value, bool | int | float):
            out[key] = value
        elif isinstance(value, str):
            out[key] = value[:MAX_CONTEXT_VALUE_CHARS]
    return out


def check_deadline(deadline_s: object, tier: Tier) -> float:
    """Seconds from now the job may take: the producer's, never more than the tier allows."""
    if deadline_s is None:
        return tier.deadline_s
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float) or not deadline_s > 0:
        raise _invalid("deadline_s", f"must be a positive number of seconds, not {deadline_s!r}")
    if deadline_s > tier.deadline_s:
        raise _invalid("deadline_s", f"{deadline_s} s is beyond the {tier.name} tier's {tier.deadline_s:g} s")
    return float(deadline_s)


def kwargs_repr(tier: object, text: object) -> str:
    """What Celery events and Flower show for a job's arguments: its size, never its text."""
    size = len(text) if isinstance(text, str) else 0
    return f"{{'job': <{tier} job, {size} chars redacted>}}"


#: the instructions of a job that gives none
DEFAULT_INSTRUCTIONS = "Summarize the document below."


def prompt_parts(spec: JobSpec) -> tuple[str, str]:
    """The user turn in two parts: the caller's instructions (or the default), which jobs share
    and the prompt cache may keep, then the document."""
    return spec.instructions or DEFAULT_INSTRUCTIONS, f"<document>\n{spec.text}\n</document>"


def build_prompt(spec: JobSpec) -> str:
    """The user turn: the caller's instructions (or a default) and the document."""
    return "\n\n".join(prompt_parts(spec))


def parse_job(job: object) -> JobSpec:
    """Validate a message body on the worker side; a malformed one is a permanent InvalidJobError."""
    try:
        return JobSpec.model_validate(job)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "job"
        raise _invalid(field, f"malformed job message: {error['msg']}") from None


def resolve_tier(spec: JobSpec, tiers: TierTable) -> Tier:
    """The tier a job names; a permanent InvalidJobError for an unknown one."""
    try:
        return tiers.tiers[spec.tier]
    except KeyError:
        raise _invalid(
            "tier", f"unknown tier {spec.tier!r}; the tiers are {', '.join(tiers.tiers)}"
        ) from None
