"""What a call used and what it cost: the token usage the API reports, and the one price table.

Prices live in ``tierq/llm/prices.toml`` (US dollars per million tokens, per model id, with their
published sources): input, output, prompt-cache writes (5 minutes and 1 hour) and reads, long-context
bands where a model has them, and the Message Batches discount. Models are matched by exact id, never
by a family substring: a model missing from the table costs ``None`` (and one warning), never a
neighbour's price.
"""

from __future__ import annotations

import re
import threading
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierq.contract.errors import ConfigError
from tierq.contract.result import Usage
from tierq.observe.logging import get_logger

__all__ = [
    "PRICES",
    "PRICES_FILE",
    "ModelPrice",
    "PriceBand",
    "PriceTable",
    "cost_usd",
    "load_price_table",
]

#: the price table shipped with tierq
PRICES_FILE = Path(__file__).with_name("prices.toml")

_log = get_logger("tierq.pricing")

#: a snapshot id: an alias plus its release date (``claude-opus-4-5-20251101``)
_DATED = re.compile(r"(claude-[a-z0-9-]+?)-\d{8}")


class PriceBand(BaseModel):
    """Dollars per million tokens of each kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write_5m: float = Field(ge=0)
    cache_write_1h: float = Field(ge=0)
    cache_read: float = Field(ge=0)

    def dollars(self, usage: Usage) -> float:
        """The cost of ``usage`` at this band's prices."""
        # the breakdown may not add up to the total when the API sends only the total: bill the rest at 5 min
        unsplit = max(
            0,
            usage.cache_creation_input_tokens
            - usage.cache_creation_5m_input_tokens
            - usage.cache_creation_1h_input_tokens,
        )
        per_mtok = (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + (usage.cache_creation_5m_input_tokens + unsplit) * self.cache_write_5m
            + usage.cache_creation_1h_input_tokens * self.cache_write_1h
            + usage.cache_read_input_tokens * self.cache_read
        )
        return per_mtok / 1_000_000


class LongContextBand(PriceBand):
    """Prices that apply to the whole request once its prompt is above ``above_input_tokens``."""

    above_input_tokens: int = Field(ge=1)


class ModelPrice(PriceBand):
    """One model's standard prices, and its long-context band where it has one."""

    id: str
    #: the shortest prompt prefix the model caches, in tokens (a shorter one is silently not cached)
    min_cacheable_tokens: int = Field(ge=1)
    long_context: LongContextBand | None = None
    sources: list[str] = Field(default_factory=list)

    def band(self, usage: Usage) -> PriceBand:
        """The prices that apply to a request of ``usage``."""
        if self.long_context is not None and usage.prompt_tokens > self.long_context.above_input_tokens:
            return self.long_context
        return self


class PriceTable(BaseModel):
    """Every priced model, and the Message Batches discount."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: what a batch call costs, as a fraction of the standard price
    batch_discount: float = Field(gt=0, le=1)
    price: list[ModelPrice]
    sources: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> PriceTable:
        ids = [p.id for p in self.price]
        if len(set(ids)) != len(ids):
            raise ValueError("a model id is priced twice")
        return self

    def get(self, model: str) -> ModelPrice | None:
        """The prices of ``model`` (exact id; a dated snapshot id such as ``claude-haiku-4-5-20251001``
        falls back to its undated alias), or None."""
        by_id = self._by_id()
        price = by_id.get(model)
        if price is None and (dated := _DATED.fullmatch(model)) is not None:
            price = by_id.get(dated.group(1))
        return price

    def _by_id(self) -> dict[str, ModelPrice]:
        return {p.id: p for p in self.price}

    def cost(self, model: str, usage: Usage, *, batch: bool = False) -> float | None:
        """Dollars for one call, or None when ``model`` has no price (warned once per model)."""
        price = self.get(model)
        if price is None:
            _warn_unpriced(model)
            return None
        dollars = price.band(usage).dollars(usage)
        if batch:
            dollars *= self.batch_discount
        return round(dollars, 10)


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_unpriced(model: str) -> None:
    with _warned_lock:
        if model in _warned:
            return
        _warned.add(model)
    _log.warning("pricing.unknown_model", model=model[:100], cost_usd=None)


def load_price_table(path: Path = PRICES_FILE) -> PriceTable:
    """Read and check a price table; ConfigError when it is missing or malformed."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        return PriceTable.model_validate(doc)
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"price table {path}: {exc}") from exc


#: the shipped table, read once at import (a data file of the package, like a constant)
PRICES = load_price_table()


def cost_usd(model: str, usage: Usage, *, batch: bool = False) -> float | None:
    """Dollars for one call of ``model`` from the shipped table, or None when it has no price."""
    return PRICES.cost(model, usage, batch=batch)
