"""tierq for producers: submit a document with an urgency, get a :class:`Job` back.

    from tierq import submit
    job = submit(document, urgency="high")
    result = job.result(timeout=30)

Everything a producer needs is importable from here; the errors are tierq's one tree
(:mod:`tierq.contract.errors`). Importing does nothing else: no environment is read, no app built,
no signal connected. The default producer and its Celery app are built on first use
(:func:`default_producer`); ``Producer(Settings(...))`` builds one from explicit settings.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tierq.contract.errors import (
        BrokerUnavailableError,
        CancelRequestedError,
        CapacityWaitError,
        ConfigError,
        DeadlineExceededError,
        DeadlineUnmeetableError,
        IdempotencyConflictError,
        InvalidJobError,
        JobCancelledError,
        JobError,
        JobExpiredError,
        JobFailedError,
        JobRefusedError,
        JobTimeoutError,
        LLMError,
        OverloadedError,
        PermanentLLMError,
        PoisonJobError,
        RateLimitedError,
        RefusedError,
        RequestRejectedError,
        RetryableLLMError,
        SpendLimitError,
        StreamInterruptedError,
        TierqError,
        UpstreamServerError,
        UpstreamUnavailableError,
    )
    from tierq.contract.result import JobResult, JobStatus
    from tierq.core.settings import Settings
    from tierq.producer import Job, Producer, Restarted, default_producer, get_job, replay, submit

#: public name → the module that defines it (imported on first access, PEP 562)
_EXPORTS = {
    **dict.fromkeys(
        [
            "BrokerUnavailableError",
            "CancelRequestedError",
            "CapacityWaitError",
            "ConfigError",
            "DeadlineExceededError",
            "DeadlineUnmeetableError",
            "IdempotencyConflictError",
            "InvalidJobError",
            "JobCancelledError",
            "JobError",
            "JobExpiredError",
            "JobFailedError",
            "JobRefusedError",
            "JobTimeoutError",
            "LLMError",
            "OverloadedError",
            "PermanentLLMError",
            "PoisonJobError",
            "RateLimitedError",
            "RefusedError",
            "RequestRejectedError",
            "RetryableLLMError",
            "SpendLimitError",
            "StreamInterruptedError",
            "TierqError",
            "UpstreamServerError",
            "UpstreamUnavailableError",
        ],
        "tierq.contract.errors",
    ),
    "JobResult": "tierq.contract.result",
    "JobStatus": "tierq.contract.result",
    "Settings": "tierq.core.settings",
    **dict.fromkeys(
        ["Job", "Producer", "Restarted", "default_producer", "get_job", "replay", "submit"], "tierq.producer"
    ),
}

__all__ = [
    "BrokerUnavailableError",
    "CancelRequestedError",
    "CapacityWaitError",
    "ConfigError",
    "DeadlineExceededError",
    "DeadlineUnmeetableError",
    "IdempotencyConflictError",
    "InvalidJobError",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobExpiredError",
    "JobFailedError",
    "JobRefusedError",
    "JobResult",
    "JobStatus",
    "JobTimeoutError",
    "LLMError",
    "OverloadedError",
    "PermanentLLMError",
    "PoisonJobError",
    "Producer",
    "RateLimitedError",
    "RefusedError",
    "RequestRejectedError",
    "Restarted",
    "RetryableLLMError",
    "Settings",
    "SpendLimitError",
    "StreamInterruptedError",
    "TierqError",
    "UpstreamServerError",
    "UpstreamUnavailableError",
    "default_producer",
    "get_job",
    "replay",
    "submit",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tierq' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
