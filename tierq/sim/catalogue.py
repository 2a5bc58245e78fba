"""The model catalogue: every model id the simulator knows, read from ``tierq/sim/catalogue.toml``.

One ``[[model]]`` table per id (an alias is its own table with ``alias_of``)::

    [[model]]
    id = "claude-haiku-4-5-20251001"
    display_name = "Claude Haiku 4.5"
    line = "haiku"
    created_at = 2025-10-01
    lifecycle = "active"              # active | deprecated | retired
    max_input_tokens = 200000         # context window
    max_tokens = 64000                # largest accepted ``max_tokens``
    min_cacheable_tokens = 4096       # shorter prompt prefixes are silently not cached
    thinks_by_default = false
    effort = false                    # accepts ``output_config.effort``
    input = 1.0                       # USD per million tokens, as are the four below
    output = 5.0
    cache_write_5m = 1.25
    cache_write_1h = 2.0
    cache_read = 0.1
    sources = ["https://platform.claude.com/docs/en/about-claude/models/overview"]

The loader fails loudly (:class:`CatalogueError`, naming the file and every bad field) on a
malformed file: a simulator that guesses a model's limits would judge the product wrongly.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, time
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["DEFAULT_PATH", "Catalogue", "CatalogueError", "Lifecycle", "ModelEntry", "load_catalogue"]

#: The packaged catalogue: ``tierq/sim/catalogue.toml``.
DEFAULT_PATH = Path(str(resources.files("tierq.sim").joinpath("catalogue.toml")))

Lifecycle = Literal["active", "deprecated", "retired"]
#: Model lines the SDK knows (``anthropic.types.ModelLine``).
Line = Literal["haiku", "sonnet", "opus", "fable", "mythos"]


class CatalogueError(ValueError):
    """Raised when the catalogue file is missing, is not TOML, or does not fit the schema."""


class ModelEntry(BaseModel):
    """One ``[[model]]`` table: a model id, its lifecycle, limits and prices."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: str = Field(min_length=1)
    #: This id is an alias: requests naming it run ``alias_of``.
    alias_of: str | None = None
    display_name: str = Field(min_length=1)
    line: Line | None = None
    created_at: date
    lifecycle: Lifecycle
    deprecated_at: date | None = None
    retires_at: date | None = None
    #: Context window, in tokens.
    max_input_tokens: int = Field(gt=0)
    #: Largest ``max_tokens`` a request may ask for.
    max_tokens: int = Field(gt=0)
    #: A cache breakpoint's prefix shorter than this is silently not cached.
    min_cacheable_tokens: int = Field(gt=0)
    #: Answers start with a ``thinking`` block unless the request turns thinking off.
    thinks_by_default: bool
    #: Accepts ``output_config.effort``.
    effort: bool
    #: Prices, USD per million tokens.
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write_5m: float = Field(ge=0)
    cache_write_1h: float = Field(ge=0)
    cache_read: float = Field(ge=0)
    #: Long-context price band where published (its own keys; the simulator does not read it).
    long_context: dict[str, Any] | None = None
    #: Where each figure comes from.
    sources: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        if self.lifecycle == "active" and self.deprecated_at is not None:
            raise ValueError("an active model has no deprecated_at")
        bad = [s for s in self.sources if not s.startswith("https://")]
        if bad:
            raise ValueError(f"sources must be https URLs: {bad}")
        return self

    def model_info(self, as_id: str | None = None) -> dict[str, Any]:
        """This entry as the Models API's ``ModelInfo`` JSON (``as_id`` overrides the id shown)."""
        return {
            "type": "model",
            "id": as_id or self.id,
            "display_name": self.display_name,
            "created_at": _rfc3339(self.created_at),
            "lifecycle": self.lifecycle,
            "deprecated_at": _rfc3339(self.deprecated_at),
            "retires_at": _rfc3339(self.retires_at),
            "line": self.line,
            "max_input_tokens": self.max_input_tokens,
            "max_tokens": self.max_tokens,
            "capabilities": None,
        }


def _rfc3339(day: date | None) -> str | None:
    if day is None:
        return None
    return datetime.combine(day, time(), tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: list[ModelEntry] = Field(min_length=1)


class Catalogue:
    """The models by id; aliases resolve to the entry they name."""

    def __init__(self, entries: list[ModelEntry], source: str = "<memory>") -> None:
        self.source = source
        self._by_id: dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.id in self._by_id:
                raise CatalogueError(f"{source}: model {entry.id!r} is listed twice")
            self._by_id[entry.id] = entry
        for entry in entries:
            if entry.alias_of is None:
                continue
            target = self._by_id.get(entry.alias_of)
            if target is None:
                raise CatalogueError(
                    f"{source}: {entry.id!r} is an alias of unknown model {entry.alias_of!r}"
                )
            if target.alias_of is not None:
                raise CatalogueError(f"{source}: {entry.id!r} is an alias of another alias {target.id!r}")

    def get(self, model_id: str) -> ModelEntry | None:
        """The entry named ``model_id`` as written (an alias entry stays an alias), or ``None``."""
        return self._by_id.get(model_id)

    def resolve(self, model_id: str) -> ModelEntry | None:
        """The model that runs a request naming ``model_id`` (aliases followed), or ``None``."""
        entry = self._by_id.get(model_id)
        if entry is not None and entry.alias_of is not None:
            return self._by_id[entry.alias_of]
        return entry

    def as_of(self, day: date) -> Catalogue:
        """This catalogue on ``day``: a model whose ``retires_at`` is on or before it is ``retired``
        (its calls 404 and the Models API says so), whatever the file wrote when it was checked.

        https://platform.claude.com/docs/en/about-claude/model-deprecations: a model "is no longer
        available" from its retirement date and requests to it fail. The SDK's own table
        (``anthropic/_data``) goes stale between releases; the date in the catalogue does not.
        """
        entries = [
            entry.model_copy(update={"lifecycle": "retired"})
            if entry.retires_at is not None and entry.retires_at <= day and entry.lifecycle != "retired"
            else entry
            for entry in self._by_id.values()
        ]
        return Catalogue(entries, self.source)

    def models(self) -> list[ModelEntry]:
        """The models the Models API lists: no aliases, most recently released first."""
        listed = [e for e in self._by_id.values() if e.alias_of is None]
        return sorted(listed, key=lambda e: (e.created_at, e.id), reverse=True)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<memory>") -> Catalogue:
        """Validate a parsed TOML document; raise :class:`CatalogueError` naming every bad field."""
        try:
            parsed = _File.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise CatalogueError(f"{source}: {problems}") from None
        return cls(parsed.model, source)


def load_catalogue(path: Path | None = None) -> Catalogue:
    """Read and validate the catalogue (the packaged ``catalogue.toml`` unless ``path`` is given)."""
    where = path or DEFAULT_PATH
    try:
        raw = where.read_bytes()
    except OSError as exc:
        raise CatalogueError(f"{where}: cannot read the model catalogue: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"{where}: not valid TOML: {exc}") from None
    return Catalogue.from_mapping(data, str(where))
