"""Tokens of a text, estimated from its characters (the rate limit's reservations, the prompt
cache's minimums) where the API's count is not at hand."""

from __future__ import annotations

import math

__all__ = ["CHARS_PER_TOKEN", "estimate_tokens"]

#: characters per input token for an estimate (English prose runs ~4; fewer overestimates, which
#: holds capacity back only until the call settles)
CHARS_PER_TOKEN = 3.5


def estimate_tokens(chars: int) -> int:
    """Input tokens of a prompt of ``chars`` characters, estimated."""
    return math.ceil(max(0, chars) / CHARS_PER_TOKEN)
