"""A Celery request class that keeps summaries out of task events (and so out of Flower).

Celery puts a repr of the return value in each ``task-succeeded`` event. tierq's result puts
``summary`` last, so the repr is cut there and the figures before it stay visible.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

__all__ = ["RedactedRequest", "redact_result_repr"]

_SUMMARY_KEY = "'summary': "


def redact_result_repr(text: str) -> str:
    """The result's repr up to its ``summary`` value, which is replaced by a marker."""
    cut = text.find(_SUMMARY_KEY)
    return text if cut < 0 else f"{text[:cut]}{_SUMMARY_KEY}'<redacted>'}}"


class RedactedRequest(Request):  # type: ignore[misc]
    """Celery's request, with the summary cut from the ``task-succeeded`` event."""

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-succeeded" and isinstance(fields.get("result"), str):
            fields["result"] = redact_result_repr(fields["result"])
        super().send_event(type, **fields)
