"""Model prices, kept in one place, and the cost of one call.

Standard (non-batch, uncached) prices in US dollars per million tokens, from Anthropic's
published pricing page as of 2026-11: Haiku 4.5 $1/$5, Sonnet 4.5 and 4.6 $3/$15, Opus 4.5
and 4.6 $5/$25. Message Batches cost 50% of these; prompt-cache writes 1.25x and reads 0.1x
of the input price (not used by tierq yet).
"""

from __future__ import annotations

__all__ = ["PRICES_PER_MTOK", "cost_usd"]

#: model family → (input, output) dollars per million tokens; matched by substring, first hit wins
PRICES_PER_MTOK: tuple[tuple[str, float, float], ...] = (
    ("haiku-4-5", 1.0, 5.0),
    ("sonnet-4", 3.0, 15.0),
    ("opus-4-5", 5.0, 25.0),
    ("opus-4-6", 5.0, 25.0),
    ("opus-4", 15.0, 75.0),
    ("haiku-3-5", 0.8, 4.0),
)


def cost_usd(model: str, input_tokens: int, output_tokens: int) -> float | None:
    """Dollars for one call, or None when the model is not in the table."""
    for family, price_in, price_out in PRICES_PER_MTOK:
        if family in model:
            return round((input_tokens * price_in + output_tokens * price_out) / 1_000_000, 8)
    return None
