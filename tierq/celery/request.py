"""A Celery request class that keeps documents and summaries out of logs and task events (Flower).

- Celery logs and sends (``task-received``) the argument reprs a message carries in its
  ``argsrepr``/``kwargsrepr`` headers, or the arguments themselves when there are none: a sender
  that never heard of tierq would put its document in Flower. The worker writes its own, from the
  job: its tier and size, never its text.
- Celery puts a repr of the return value in each ``task-succeeded`` event. tierq's result puts
  ``metadata`` and ``summary`` last, so the repr is cut there and the figures before it stay visible.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

from tierq.contract.job import kwargs_repr

__all__ = ["RedactedRequest", "redact_result_repr"]

#: the first of the result's fields that a task event never shows (the sender's metadata, the summary)
_CUT_AT = ("'metadata': ", "'summary': ")


def redact_result_repr(text: str) -> str:
    """The result's repr up to its ``metadata`` (or ``summary``), then a marker."""
    cuts = [at for at in (text.find(key) for key in _CUT_AT) if at >= 0]
    return text if not cuts else f"{text[: min(cuts)]}'<redacted>': '<metadata and summary>'}}"


def _job_repr(kwargs: object) -> str:
    job = kwargs.get("job") if isinstance(kwargs, dict) else None
    if not isinstance(job, dict):
        return "{}"
    tier = job.get("tier")
    return kwargs_repr(tier if isinstance(tier, str) and len(tier) <= 32 else "?", job.get("text"))


class RedactedRequest(Request):  # type: ignore[misc]
    """Celery's request, with its own argument reprs and the summary cut from ``task-succeeded``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._argsrepr = "()"
        self._kwargsrepr = _job_repr(self._kwargs)

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-succeeded" and isinstance(fields.get("result"), str):
            fields["result"] = redact_result_repr(fields["result"])
        super().send_event(type, **fields)
