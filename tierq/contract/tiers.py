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

A tier with a ``[tiers.<name>.batch]`` table goes through the Message Batches API (every token at
half price, results within 24 hours): see :class:`BatchPolicy` and ``docs/batches.md``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierq.contract.errors import ConfigError

__all__ = [
    "DEFAULT_TIERS",
    "SAMPLING_FIELDS",
    "URGENCIES",
    "BatchPolicy",
    "Effort",
    "Tier",
    "TierTable",
    "load_tier_table",
]

#: request fields API version 2026-10-21 rejects (https://platform.claude.com/docs/en/api/versioning);
#: a tiers file that sets one is refused at load
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")

#: values of ``output_config.effort`` (the SDK's ``OutputConfigParam``)
Effort = Literal["low", "medium", "high", "xhigh", "max"]

#: the most of a model's rate limit that the tiers calling it may keep for themselves together
MAX_KEPT_SHARE = 0.9

#: the urgency words a producer may use, most urgent first
URGENCIES = ("critical", "high", "normal", "low", "bulk")

#: Message Batches limits (https://platform.claude.com/docs/en/build-with-claude/batch-processing,
#: "Batch limitations": 100,000 requests or 256 MB, whichever is reached first)
BATCH_MAX_REQUESTS = 100_000
BATCH_MAX_BYTES = 256_000_000

_SUMMARIZE = (
    "You summarize documents for other services. Reply with the summary only: no preamble, "
    "no headings, no quotes around it."
)


class BatchPolicy(BaseModel):
    """How a tier's jobs go through the Message Batches API: gathered into one batch until it holds
    ``max_requests`` jobs or ``max_bytes`` of requests, or its oldest job has waited ``max_age_s``;
    the batch is then polled, first after ``poll_s`` seconds, the gap doubling up to ``poll_max_s``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_requests: int = Field(default=10_000, ge=1, le=BATCH_MAX_REQUESTS)
    #: the batch's requests as JSON; a job larger than this goes alone
    max_bytes: int = Field(default=64_000_000, ge=1_000, le=BATCH_MAX_BYTES)
    max_age_s: float = Field(default=5.0, gt=0, le=3600)
    poll_s: float = Field(default=1.0, gt=0, le=600)
    poll_max_s: float = Field(default=60.0, gt=0, le=3600)


class Tier(BaseModel):
    """One latency tier: a queue, the model behind it and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    #: the Celery queue (a Redis list) this tier's pool consumes
    queue: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$")
    model: str
    #: the cap on output tokens; a producer may ask for less, never more
    max_tokens: int = Field(ge=1, le=64_000)
    #: ``output_config.effort`` for models that take it (how hard the model thinks: fewer thinking
    #: tokens, sooner text); unset (``""`` in a tiers file) leaves the model's default. Haiku 4.5
    #: takes none. There is no
    #: sampling knob: API 2026-10-21 rejects ``temperature``, ``top_p`` and ``top_k`` (see below)
    effort: Effort | None = None
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
    #: share (0 to 1) of its model's rate limit kept for this tier: a less urgent tier (longer
    #: ``deadline_s``) calling the same model leaves it untouched (see :meth:`TierTable.floor`)
    rate_limit_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: seconds a job may wait for rate-limit capacity in its pool thread (never more than a quarter
    #: of the time its deadline leaves it); a longer wait sends the job back to its queue with that
    #: countdown, holding no thread and spending none of ``max_retries``
    rate_limit_wait_s: float = Field(default=0.5, ge=0.0, le=60.0)
    #: retry a reply that broke after its first text (the text so far is billed again, and a live
    #: ``Job.stream()`` reader is told ``Restarted``); off: such a job fails ``StreamInterruptedError``
    retry_after_text: bool = False
    #: set: the tier's jobs go through the Message Batches API instead of one call each (every token
    #: at half price; a batch ends within 24 hours). Not set: each job is its own streamed call
    batch: BatchPolicy | None = None
    #: set: only a job whose deadline leaves more than this many seconds when it starts goes through
    #: Message Batches (``batch`` defaults to :class:`BatchPolicy`); any other takes the Messages
    #: path. Set it above the time your batches take to end (most within an hour, all within 24 h):
    #: a batched job whose deadline passes before its batch answers fails ``DeadlineExceededError``
    batch_when_slack_s: float | None = Field(default=None, gt=0, le=86_400)

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("effort") == "":
            # TOML has no null: ``effort = ""`` unsets a built-in tier's effort (a model that takes
            # none, such as Haiku 4.5, answers 400 to any)
            data = {**data, "effort": None}
        if data.get("batch_when_slack_s") is not None and data.get("batch") is None:
            data = {**data, "batch": {}}
        for name in SAMPLING_FIELDS:
            if name in data:
                raise ValueError(
                    f"{name}: not a tier setting. Anthropic API version 2026-10-21 (sent by the "
                    f"anthropic SDK 2.x) rejects {', '.join(SAMPLING_FIELDS)} with HTTP 400, even at "
                    "their defaults; shape a summary with a tight max_tokens and a short instruction, "
                    "and speed with effort"
                )
        return data

    @model_validator(mode="after")
    def _slack_below_deadline(self) -> Tier:
        if self.batch_when_slack_s is not None and self.batch_when_slack_s >= self.deadline_s:
            raise ValueError(
                f"batch_when_slack_s ({self.batch_when_slack_s:g} s) must be below deadline_s "
                f"({self.deadline_s:g} s): no job of this tier could ever have that much slack"
            )
        return self

    def takes_batch(self, slack_s: float) -> bool:
        """Whether a job with ``slack_s`` seconds left before its deadline goes through Message Batches."""
        if self.batch is None:
            return False
        return self.batch_when_slack_s is None or slack_s > self.batch_when_slack_s


#: the built-in tiers (fields as in :class:`Tier`)
DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "fast": {
        "queue": "tierq.fast",
        "model": "claude-haiku-4-5",
        "max_tokens": 256,
        "deadline_s": 15.0,
        "concurrency": 32,
        "max_input_chars": 50_000,
        "max_retries": 2,
        "retry_backoff_s": 0.5,
        "retry_backoff_max_s": 4.0,
        # a broken stream re-billed costs at most 256 output tokens: worth it for a 15 s deadline
        "retry_after_text": True,
        # a quarter of its model's limit stays out of reach of slower tiers on the same model, and
        # a fast job waits for capacity in its thread (a requeue would cost it its place)
        "rate_limit_share": 0.25,
        "rate_limit_wait_s": 3.75,
    },
    "standard": {
        "queue": "tierq.standard",
        # the current Sonnet (claude-sonnet-4-5 is deprecated, end of life 2026-11-30; 4.6 and 5 are
        # legacy); it thinks by default and thinking tokens count toward max_tokens: low effort
        # keeps a summary's thinking short
        "model": "claude-sonnet-5-5",
        "effort": "low",
        "max_tokens": 1024,
        "deadline_s": 300.0,
        "concurrency": 16,
        "max_input_chars": 200_000,
        "max_retries": 4,
    },
    "slow": {
        "queue": "tierq.slow",
        # the current Opus (claude-opus-4-5 is deprecated, end of life 2027-01-22); it always thinks
        "model": "claude-opus-5-5",
        "effort": "medium",
        "max_tokens": 4096,
        "deadline_s": 1800.0,
        "concurrency": 8,
        "max_input_chars": 600_000,
        "max_retries": 6,
        "retry_backoff_max_s": 120.0,
    },
    "bulk": {
        "queue": "tierq.bulk",
        # the standard tier's model and effort, at half price: a job that can wait a day
        "model": "claude-sonnet-5-5",
        "effort": "low",
        "max_tokens": 1024,
        # a batch ends within 24 h (https://platform.claude.com/docs/en/build-with-claude/batch-processing)
        "deadline_s": 86_400.0,
        "concurrency": 8,
        "max_input_chars": 200_000,
        "max_retries": 3,
        "batch": {},
    },
}

#: which tier serves each urgency by default
DEFAULT_URGENCIES = {"critical": "fast", "high": "fast", "normal": "standard", "low": "slow", "bulk": "bulk"}


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
        for model in {m for t in self.tiers.values() for m in (t.model, t.fallback_model) if m}:
            callers = [t for t in self.tiers.values() if model in (t.model, t.fallback_model)]
            kept = sum(t.rate_limit_share for t in callers)
            if kept > MAX_KEPT_SHARE:
                raise ValueError(
                    f"the tiers calling {model} keep {kept:.2f} of its rate limit (rate_limit_share); "
                    f"at most {MAX_KEPT_SHARE} may be kept, or the least urgent tier could never run"
                )
        return self

    def for_urgency(self, urgency: str) -> Tier:
        """The tier serving ``urgency``; KeyError when the word is unknown."""
        return self.tiers[self.urgencies[urgency]]

    def floor(self, tier: Tier, model: str) -> float:
        """The share of ``model``'s rate limit that ``tier`` leaves untouched: the shares of every
        more urgent tier (shorter deadline; on a tie, earlier in the table) that calls ``model``,
        as its model or its fallback."""
        order = list(self.tiers)
        rank = (tier.deadline_s, order.index(tier.name) if tier.name in order else len(order))
        return sum(
            other.rate_limit_share
            for index, other in enumerate(self.tiers.values())
            if (other.deadline_s, index) < rank and model in (other.model, other.fallback_model)
        )

    @property
    def slowest_deadline_s(self) -> float:
        """The longest deadline of any tier."""
        return max(t.deadline_s for t in self.tiers.values())


def load_tier_table(path: Path | None = None) -> TierTable:
    """Build the tier table from the defaults, overridden by the TOML file at ``path``.

    Raises :class:`ConfigError` naming the file and, where it can be found, the line at fault.
    """
    raw_tiers: dict[str, dict[str, Any]] = {name: dict(fields) for name, fields in DEFAULT_TIERS.items()}
    urgencies = dict(DEFAULT_URGENCIES)
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
            doc = tomllib.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read tiers file {path}: {exc}") from exc
        unknown = set(doc) - {"tiers", "urgencies"}
        if unknown:
            raise ConfigError(f"tiers file {path}: unknown sections {sorted(unknown)}")
        for name, fields in doc.get("tiers", {}).items():
            if not isinstance(fields, dict):
                line = _line(text, "tiers", name)
                raise ConfigError(f"tiers file {path}{line}: tiers.{name} is not a table")
            raw_tiers.setdefault(name, {}).update(fields)
        urgencies.update(doc.get("urgencies", {}))
    where = f"tiers file {path}" if path else "default tiers"
    tiers: dict[str, Tier] = {}
    for name, fields in raw_tiers.items():
        try:
            tiers[name] = Tier(name=name, **fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            keys = [str(part) for part in first["loc"]]
            line = _line(text, f"tiers.{name}", *keys[:1]) or _line(text, f"tiers.{name}")
            raise ConfigError(f"{where}{line}: tiers.{name}: {_problems(exc, 'tier')}") from exc
        except TypeError as exc:
            raise ConfigError(f"{where}{_line(text, f'tiers.{name}')}: tiers.{name}: {exc}") from exc
    try:
        return TierTable(tiers=tiers, urgencies=urgencies)
    except ValidationError as exc:
        raise ConfigError(f"{where}{_line(text, 'urgencies')}: {_problems(exc, '')}") from exc


def _problems(exc: ValidationError, whole: str) -> str:
    """Each of a validation's errors as ``field: message`` (``whole`` names a rule across fields)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or whole}: {e['msg']}" for e in exc.errors())


def _line(text: str, table: str, key: str | None = None) -> str:
    """``", line N"`` for ``key`` in the TOML ``[table]`` (or the table's own header), else ``""``.

    A plain reading of the lines, for error messages: it finds ``[tiers.fast]`` and ``key = ...``
    in it, or ``tiers.fast.key = ...`` / ``[tiers.fast.batch]`` written another way.
    """
    current = ""
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped.strip("[]").replace(" ", "").replace('"', "")
            if key is None and (current == table or current.startswith(f"{table}.")):
                return f", line {number}"
            continue
        name = stripped.split("=", 1)[0].strip().replace('"', "") if "=" in stripped else ""
        if key is not None and current == table and name == key:
            return f", line {number}"
        if key is not None and not current and name == f"{table}.{key}":
            return f", line {number}"
    return ""
