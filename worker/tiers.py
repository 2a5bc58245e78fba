"""Latency tiers: which queue, model and limits serve each urgency.

The defaults below can be overridden, tier by tier and field by field, from a TOML file named by
``TIERQ_TIERS_FILE``::

    [tiers.fast]
    max_tokens = 128
    concurrency = 64

    [tiers.batch]            # a new tier needs every field without a default
    queue = "tierq.batch"
    model = "claude-haiku-4-5"
    max_tokens = 2048
    deadline_s = 3600

    [urgencies]
    low = "batch"
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.errors import ConfigError
from worker.settings import get_settings

__all__ = ["DEFAULT_TIERS", "URGENCIES", "Tier", "TierTable", "get_tier_table", "load_tier_table"]

#: the urgency words a producer may use, most urgent first
URGENCIES = ("critical", "high", "normal", "low")

_SUMMARIZE = (
    "You summarize documents for other services. Reply with the summary only: no preamble, "
    "no headings, no quotes around it."
)


class Tier(BaseModel):
    """One latency tier: a queue, the model behind it and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    #: the Celery queue (a Redis list) this tier's pool consumes
    queue: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$")
    model: str
    #: the cap on output tokens; a producer may ask for less, never more
    max_tokens: int = Field(ge=1, le=64_000)
    #: sampling temperature; unset leaves the model's default (sent as an extra body field: SDK 2.x
    #: has no typed parameter for it)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    system_prompt: str = _SUMMARIZE
    #: seconds a job may take from enqueue to result, retries included
    deadline_s: float = Field(gt=0)
    #: in-flight jobs per worker process (threads in the pool)
    concurrency: int = Field(default=16, ge=1, le=4096)
    #: how a pool thread makes the model call: ``asyncio`` hands it to the process's event loop
    #: (``AsyncAnthropic`` over aiohttp, ~3x less CPU per call at hundreds in flight, see
    #: docs/latency.md); ``threads`` reads the stream in the pool thread with the sync client
    io: Literal["asyncio", "threads"] = "asyncio"
    #: characters of input text a job may carry
    max_input_chars: int = Field(default=200_000, ge=1)
    #: attempts after the first, bounded again by the deadline
    max_retries: int = Field(default=3, ge=0, le=20)
    #: base and cap, in seconds, of the jittered exponential backoff between attempts
    retry_backoff_s: float = Field(default=1.0, ge=0)
    retry_backoff_max_s: float = Field(default=30.0, ge=0)
    #: a model to switch to after ``fallback_after`` attempts ended overloaded (529); unset: keep waiting
    fallback_model: str | None = None
    fallback_after: int = Field(default=2, ge=1)


#: the built-in tiers (fields as in :class:`Tier`)
DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "fast": {
        "queue": "tierq.fast",
        "model": "claude-haiku-4-5",
        "max_tokens": 256,
        "temperature": 0.2,
        "deadline_s": 15.0,
        "concurrency": 32,
        "max_input_chars": 50_000,
        "max_retries": 2,
        "retry_backoff_s": 0.5,
        "retry_backoff_max_s": 4.0,
    },
    "standard": {
        "queue": "tierq.standard",
        # not claude-sonnet-4-5: the SDK lists it as deprecated, end of life 2026-11-30
        "model": "claude-sonnet-4-6",
        "max_tokens": 1024,
        "deadline_s": 300.0,
        "concurrency": 16,
        "max_input_chars": 200_000,
        "max_retries": 4,
    },
    "slow": {
        "queue": "tierq.slow",
        "model": "claude-opus-4-5",
        "max_tokens": 4096,
        "deadline_s": 1800.0,
        "concurrency": 8,
        "max_input_chars": 600_000,
        "max_retries": 6,
        "retry_backoff_max_s": 120.0,
    },
}

#: which tier serves each urgency by default
DEFAULT_URGENCIES = {"critical": "fast", "high": "fast", "normal": "standard", "low": "slow"}


class TierTable(BaseModel):
    """All tiers and the urgency → tier map, checked for consistency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tiers: dict[str, Tier]
    urgencies: dict[str, str]

    @model_validator(mode="after")
    def _consistent(self) -> TierTable:
        for urgency, tier in self.urgencies.items():
            if tier not in self.tiers:
                raise ValueError(f"urgency {urgency!r} maps to unknown tier {tier!r}")
        queues = [t.queue for t in self.tiers.values()]
        if len(set(queues)) != len(queues):
            raise ValueError("two tiers share a queue; each tier needs its own")
        return self

    def for_urgency(self, urgency: str) -> Tier:
        """The tier serving ``urgency``; KeyError when the word is unknown."""
        return self.tiers[self.urgencies[urgency]]

    @property
    def slowest_deadline_s(self) -> float:
        """The longest deadline of any tier."""
        return max(t.deadline_s for t in self.tiers.values())


def load_tier_table(path: Path | None = None) -> TierTable:
    """Build the tier table from the defaults, overridden by the TOML file at ``path``."""
    raw_tiers: dict[str, dict[str, Any]] = {name: dict(fields) for name, fields in DEFAULT_TIERS.items()}
    urgencies = dict(DEFAULT_URGENCIES)
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read tiers file {path}: {exc}") from exc
        unknown = set(doc) - {"tiers", "urgencies"}
        if unknown:
            raise ConfigError(f"tiers file {path}: unknown sections {sorted(unknown)}")
        for name, fields in doc.get("tiers", {}).items():
            raw_tiers.setdefault(name, {}).update(fields)
        urgencies.update(doc.get("urgencies", {}))
    try:
        return TierTable(
            tiers={name: Tier(name=name, **fields) for name, fields in raw_tiers.items()},
            urgencies=urgencies,
        )
    except ValidationError as exc:
        where = f"tiers file {path}" if path else "default tiers"
        raise ConfigError(f"{where}: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"tiers file {path}: {exc}") from exc


@lru_cache(maxsize=1)
def get_tier_table() -> TierTable:
    """The process's tier table, from settings, loaded once."""
    return load_tier_table(get_settings().tiers_file)
