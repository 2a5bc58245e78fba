"""tierq for producers: submit a document with an urgency, get a :class:`Job` back.

    from tierq import submit
    job = submit(document, urgency="high")
    result = job.result(timeout=30)

Everything a producer needs is importable from here; the errors are tierq's one tree
(:mod:`tasks.errors`).
"""

from tasks.errors import (
    BrokerUnavailableError,
    IdempotencyConflictError,
    InvalidJobError,
    JobCancelledError,
    JobError,
    JobExpiredError,
    JobFailedError,
    JobRefusedError,
    JobTimeoutError,
    TierqError,
)
from tasks.result import JobResult
from tierq.producer import Job, Producer, Restarted, default_producer, get_job, replay, submit
from worker.core.settings import Settings

__all__ = [
    "BrokerUnavailableError",
    "IdempotencyConflictError",
    "InvalidJobError",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobExpiredError",
    "JobFailedError",
    "JobRefusedError",
    "JobResult",
    "JobTimeoutError",
    "Producer",
    "Restarted",
    "Settings",
    "TierqError",
    "default_producer",
    "get_job",
    "replay",
    "submit",
]
