"""Who is calling: bearer tokens per producer, of which only SHA-256 hashes are ever stored.

A token table maps a producer's name to the hex SHA-256 of its token. It comes from a file (TOML
or JSON, one ``name = "sha256hex"`` per producer) or a string (``name:sha256hex,name2:sha256hex``)::

    # api-tokens.toml
    billing = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    search = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"

The name becomes the job id's prefix (``billing.<key>``) and the job's ``producer_id``, so it is
kept to letters, digits, ``_`` and ``-``: no dot, so that one producer's prefix never starts
another's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from tierq.contract.errors import ConfigError

__all__ = ["ANONYMOUS", "PRODUCER_NAME_RE", "TokenTable", "hash_token", "load_tokens"]

#: the producer every request is taken for when the API runs without tokens (``--insecure-no-auth``)
ANONYMOUS = "anonymous"
#: what a producer's name may be: the job id's prefix, up to its dot
PRODUCER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
_SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token's UTF-8 bytes: what a token table holds."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenTable:
    """Producer name → SHA-256 of its token; :meth:`authenticate` finds who holds a token."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        checked: dict[str, bytes] = {}
        for name, digest in hashes.items():
            if not isinstance(name, str) or not PRODUCER_NAME_RE.fullmatch(name):
                raise ConfigError(
                    f"API token name {name!r}: use 1 to 48 letters, digits, '_' or '-' (it prefixes job ids)"
                )
            if not isinstance(digest, str) or not _SHA256_HEX_RE.fullmatch(digest):
                raise ConfigError(
                    f"API token of {name!r}: give the hex SHA-256 of the token (64 hex digits), "
                    "never the token itself"
                )
            checked[name] = bytes.fromhex(digest)
        self._hashes = checked

    def __len__(self) -> int:
        return len(self._hashes)

    @property
    def names(self) -> list[str]:
        """The producers that have a token."""
        return list(self._hashes)

    def authenticate(self, token: str) -> str | None:
        """The name of the producer whose token this is; None for an unknown token.

        Every entry is compared (``hmac.compare_digest``), so the time taken says nothing of which
        one matched or how much of a hash did.
        """
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for name, expected in self._hashes.items():
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def _parse_pairs(text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, digest = item.partition(":")
        if not sep:
            raise ConfigError(f"API tokens: {item[:20]!r}... is not name:sha256hex")
        if name.strip() in pairs:
            raise ConfigError(f"API tokens: {name.strip()!r} is given twice")
        pairs[name.strip()] = digest.strip()
    return pairs


def _read_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API tokens file {path}: {exc}") from None
    try:
        doc: object = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"API tokens file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"API tokens file {path}: expected a mapping of producer name to sha256 hex")
    return doc


def load_tokens(file: Path | None = None, pairs: str | None = None) -> TokenTable:
    """The token table from a TOML/JSON file and/or a ``name:sha256hex,...`` string; a name in both
    is refused. Empty when neither is given."""
    hashes: dict[str, str] = {}
    if file is not None:
        hashes.update(_read_file(file))
    if pairs:
        for name, digest in _parse_pairs(pairs).items():
            if name in hashes:
                raise ConfigError(f"API tokens: {name!r} is in both the tokens file and the tokens string")
            hashes[name] = digest
    return TokenTable(hashes)
