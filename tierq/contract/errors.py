"""Every error tierq raises, in one tree.

::

    TierqError
    ├── ConfigError                  bad settings or tiers file
    ├── InvalidJobError              bad producer input; nothing was enqueued
    │   └── IdempotencyConflictError     a job id already names a different request
    ├── BrokerUnavailableError       the broker did not answer in time
    ├── DeadlineUnmeetableError      the job could not start before its deadline; nothing was enqueued
    ├── PoisonJobError               a job kept crashing its worker; given up unrun
    ├── CancelRequestedError         the job's producer cancelled it (worker side)
    ├── JobError                     a job ended without a summary (producer side)
    │   ├── JobFailedError
    │   │   ├── JobExpiredError      its deadline passed, queued or running
    │   │   ├── JobCancelledError    its producer cancelled it
    │   │   └── JobRefusedError      the model refused (stop_reason "refusal")
    │   └── JobTimeoutError
    └── LLMError                     a call to the model failed
        ├── RetryableLLMError        worth another attempt
        │   ├── RateLimitedError         429
    │   │   └── CapacityWaitError        the shared rate limit had no room within this attempt's wait
        │   ├── OverloadedError          529, or an ``overloaded_error`` event mid-stream
        │   ├── UpstreamServerError      other 5xx
        │   └── UpstreamUnavailableError connection refused, reset or timed out
        └── PermanentLLMError        retrying cannot help
            ├── RequestRejectedError     400/401/403/404/413/422 and other 4xx, or x-should-retry: false
            │   └── SpendLimitError          429 enforced_spend_limit_reached: the spend limit is reached
            ├── RefusedError             the model refused to answer (stop_reason "refusal")
            ├── StreamInterruptedError   the stream broke after text was produced (retried only
            │                            where the tier says ``retry_after_text``)
            └── DeadlineExceededError    the job's deadline passed

The SDK's typed errors are mapped into this tree in one place, :func:`tierq.llm.client.map_sdk_error`.
An error the API answered keeps its ``error.type`` and message (bounded) in the exception's
message. Every class can be rebuilt from its ``args``, because Celery stores a failed task's
exception as ``(type, args)`` in JSON and the producer rebuilds it with ``cls(*args)``.
"""

from __future__ import annotations

__all__ = [
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
]


class TierqError(Exception):
    """Raised for anything tierq itself reports; the root of the tree."""


class ConfigError(TierqError):
    """Raised when settings or the tiers file are invalid."""


class InvalidJobError(TierqError, ValueError):
    """Raised when a job's input is invalid; ``field`` names the offending input."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class IdempotencyConflictError(InvalidJobError):
    """Raised when a job id was already used for a different request (text, tier, instructions,
    max_tokens or metadata): a job id is an idempotency key, never a way to read another job's result."""

    def __init__(self, message: str, field: str = "job_id") -> None:
        super().__init__(message, field)


class BrokerUnavailableError(TierqError):
    """Raised when the broker cannot be reached to enqueue a job."""


class DeadlineUnmeetableError(TierqError):
    """Raised by ``submit`` when the job could not start before its deadline (the model's shared
    rate limit and the tier's queue say when it would): nothing was enqueued. ``retry_after``: seconds
    after which the same job would be admitted, as far as can be told now (HTTP 429 ``Retry-After``)."""

    def __init__(
        self, message: str, retry_after: float | None = None, predicted_start_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: seconds from now until the job was predicted to start
        self.predicted_start_s = predicted_start_s
        self.args = (message, retry_after, predicted_start_s)

    def __str__(self) -> str:
        return str(self.args[0])


class PoisonJobError(TierqError):
    """Raised when a job started more often than its attempts allow: it keeps crashing its worker."""


class CancelRequestedError(TierqError):
    """Raised in the worker when the job's producer cancelled it: the job ends ``cancelled``."""


class JobError(TierqError):
    """Raised on the producer side when a job did not produce a summary."""


class JobFailedError(JobError):
    """Raised when a job ended in failure; ``error_type`` names the worker-side error."""

    def __init__(self, message: str, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class JobExpiredError(JobFailedError):
    """Raised when a job's deadline passed before it produced a summary."""


class JobCancelledError(JobFailedError):
    """Raised when the job was cancelled (``Job.cancel()``, ``DELETE /v1/jobs/{id}``) before it ended."""


class JobRefusedError(JobFailedError):
    """Raised when the model refused to summarize; ``category`` and ``explanation`` say why, when given."""

    def __init__(
        self, message: str, error_type: str = "", category: str | None = None, explanation: str | None = None
    ) -> None:
        super().__init__(message, error_type)
        self.category = category
        self.explanation = explanation


class JobTimeoutError(JobError, TimeoutError):
    """Raised when waiting for a job's result took longer than the caller allowed."""


class LLMError(TierqError):
    """Raised when a call to the model failed."""

    #: whether another attempt may succeed
    retryable = False

    def __init__(self, message: str, status_code: int | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.request_id = request_id


class RetryableLLMError(LLMError):
    """Raised for failures that another attempt may fix; ``retry_after`` is the server's hint."""

    retryable = True

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code, request_id)
        self.retry_after = retry_after


class RateLimitedError(RetryableLLMError):
    """Raised on HTTP 429; honour ``retry_after``."""


class CapacityWaitError(RateLimitedError):
    """Raised when the deployment's shared rate limit (not the API) had no room for the call within
    the wait this attempt may spend: no request was sent. The job goes back to its queue for
    ``retry_after`` seconds without spending one of its tier's retries, and ends rate limited when
    its deadline would pass first."""


class OverloadedError(RetryableLLMError):
    """Raised on HTTP 529, or an ``overloaded_error`` event before any text was streamed."""


class UpstreamServerError(RetryableLLMError):
    """Raised on HTTP 5xx other than 529."""


class UpstreamUnavailableError(RetryableLLMError):
    """Raised when the API could not be reached or did not answer in time."""


class PermanentLLMError(LLMError):
    """Raised for failures that another attempt would repeat."""


class RequestRejectedError(PermanentLLMError):
    """Raised when the API rejected the request (400, 401, 403, 404, 413, 422 and other 4xx)."""


class SpendLimitError(RequestRejectedError):
    """Raised on a 429 whose ``error.details.error_code`` is ``enforced_spend_limit_reached``."""


class RefusedError(PermanentLLMError):
    """Raised when the reply ended with ``stop_reason: "refusal"``; a retry would be refused again."""

    def __init__(
        self,
        message: str,
        category: str | None = None,
        explanation: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, None, request_id)
        self.category = category
        self.explanation = explanation
        # what Celery stores, to rebuild this error with ``cls(*args)`` on the producer side
        self.args = (message, category, explanation, request_id)

    def __str__(self) -> str:
        return str(self.args[0])


class StreamInterruptedError(PermanentLLMError):
    """Raised when a stream failed after text was produced; retrying would bill the output twice."""


class DeadlineExceededError(PermanentLLMError):
    """Raised when a job's deadline passed, or no retry could finish before it."""
