"""Which queue a delivery came from, the one thing about a message the worker takes from the broker.

On Redis, :mod:`tierq.celery.transport` writes the list the message was popped from into its
``delivery_info.routing_key``. On RabbitMQ the broker routed it by that key; a retry with a countdown
goes through RabbitMQ's native delayed delivery, whose routing key is the countdown in 28 binary
digits, then the queue's own key (kombu's ``native_delayed_delivery.calculate_routing_key``).
"""

from __future__ import annotations

import re

__all__ = ["delivered_queue"]

#: the countdown prefix of a natively delayed message's routing key: 28 levels of "0." or "1."
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def delivered_queue(delivery_info: object) -> str | None:
    """The queue of a delivery, from its ``delivery_info``; None when it names none."""
    key = delivery_info.get("routing_key") if isinstance(delivery_info, dict) else None
    if not isinstance(key, str) or not key:
        return None
    return _DELAY_PREFIX.sub("", key, count=1)
