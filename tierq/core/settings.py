"""Typed settings, read once from the environment (prefix ``TIERQ_``) and an optional ``.env``.

The Anthropic key and base URL are read from ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL``,
the same variables the SDK reads. The key is held as a ``SecretStr`` and never logged.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tierq.contract.errors import ConfigError
from tierq.contract.tiers import TierTable, load_tier_table

__all__ = [
    "BACKEND_SCHEMES",
    "BROKER_SCHEMES",
    "DEFAULT_BROKER_URL",
    "DEFAULT_LEASE_S",
    "MAX_CRASHES",
    "Settings",
    "get_settings",
    "get_tier_table",
]

#: the Redis these machines run; ``make demo`` starts its own instead
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: seconds a Redis delivery (and a job's run lock) lives past its worker's last heartbeat
DEFAULT_LEASE_S = 3.0
#: starts beyond its tier's attempts that a job may crash its worker before it is given up (poison)
MAX_CRASHES = 2
#: the broker URL schemes tierq runs with: Redis (plain or TLS, with leased deliveries) and RabbitMQ
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")
#: the result backend URL schemes: tierq keeps its own keys (run guard, limiter, streams) there
BACKEND_SCHEMES = ("redis", "rediss")
#: what to say of a scheme kombu or Celery would take but tierq cannot keep its promises with
_INSTEAD = {
    "sentinel": "Sentinel is not supported yet (its transport has no leases: a dead worker's jobs "
    "would wait 40 minutes); point the URL at the master with redis:// or rediss://",
    "sentinels": "as for sentinel://",
    "redis+socket": "a Unix socket is not supported yet; use redis:// over TCP on loopback",
    "unix": "a Unix socket is not supported yet; use redis:// over TCP on loopback",
}


def _check_scheme(name: str, url: str, allowed: tuple[str, ...]) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "rediss" and "ssl_cert_reqs=" not in url.split("?", 1)[-1]:
        raise ValueError(
            f"{name}: a rediss:// URL needs ssl_cert_reqs in its query (?ssl_cert_reqs=required, "
            "and &ssl_ca_certs=PATH for a private CA): kombu would not check the server's certificate"
        )
    if scheme in allowed:
        return url
    instead = _INSTEAD.get(scheme, f"use {', '.join(f'{s}://' for s in allowed)}")
    raise ValueError(f"{name}: scheme {scheme or url[:20]!r} is not supported: {instead}")


class Settings(BaseSettings):
    """Everything tierq reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="TIERQ_", env_file=".env", extra="ignore")

    #: Celery broker; ``rediss://`` and passwords work as in redis-py URLs
    broker_url: str = DEFAULT_BROKER_URL
    #: result backend; defaults to the broker's Redis
    result_backend: str | None = None
    #: prepended to every Redis key tierq's broker and result backend use (share a database safely)
    key_prefix: str = ""
    #: a TOML file overriding the default tier table (see ``tierq/contract/tiers.py``)
    tiers_file: Path | None = None
    #: seconds a finished job's result is kept
    result_expires_s: int = 24 * 3600
    #: seconds a job's delivery and run lock outlive its worker's last heartbeat (every third of
    #: this): a worker that died (kill -9, OOM, a lost node) has its jobs put back on their queue by
    #: a live worker of the same tier this long after its last heartbeat. A live worker's jobs are
    #: never redelivered, however long they run; it must not stall longer than this (GC, swap)
    lease_s: float = Field(default=DEFAULT_LEASE_S, ge=1.0, le=600.0)
    #: seconds between a worker's scans for deliveries whose lease lapsed
    restore_interval_s: float = Field(default=1.0, gt=0, le=60.0)
    #: share one rate limit per model between every worker (in the result backend's Redis), fed by
    #: the API's rate-limit headers
    rate_limit: bool = True
    #: each model's limits per minute until the API's headers say otherwise
    rate_limits: str = "requests=4000,input_tokens=2000000,output_tokens=400000"
    #: reserve a call's input at what the API's token-counting endpoint counts (one more request per
    #: attempt, to an endpoint with limits of its own) instead of its characters / 3.5
    count_tokens: bool = False
    #: mark a request's stable prefix (system prompt, then instructions) with a prompt-cache
    #: breakpoint when it reaches the model's minimum and was sent again within minutes
    prompt_cache: bool = True
    #: each producer's weight in its tier's fair share of a model's rate limit, ``name=weight,...``
    #: (names as jobs' ``producer_id``; 1 when not named)
    producer_weights: str = ""
    #: refuse at submit (DeadlineUnmeetableError, HTTP 429) a job predicted to start too late to
    #: finish before its deadline, from its tier's queue and its model's shared rate limit
    admission: bool = True
    #: connections per process to Redis (redis-py 8 fails instead of waiting when the pool is full)
    redis_max_connections: int = 512

    #: the API key, read where the SDK reads it; unset means the simulator is expected
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "TIERQ_ANTHROPIC_API_KEY")
    )
    #: a file holding the API key (a mounted secret), read when ANTHROPIC_API_KEY is unset
    anthropic_api_key_file: Path | None = None
    #: the API's base URL, read where the SDK reads it (the simulator's URL in tests and the demo)
    anthropic_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "TIERQ_ANTHROPIC_BASE_URL")
    )
    #: seconds allowed to open a connection to the API
    connect_timeout_s: float = 5.0
    #: ask the Models API about each served tier's model as a worker starts (refuse a retired or
    #: unknown one, warn on a deprecated one); off for gateways that do not serve ``/v1/models``
    check_models: bool = True

    #: port of each worker's Prometheus ``/metrics`` (unset: not served); 0 picks a free one
    metrics_port: int | None = None
    #: address the metrics server binds: loopback unless told otherwise (containers set 0.0.0.0, so
    #: that Prometheus can scrape them; the metrics carry no secret, but need not face a network)
    metrics_addr: str = "127.0.0.1"
    #: entries kept in the Redis stream of recent jobs that ``tierq stats`` reads
    stats_maxlen: int = 10_000
    #: ``user:password`` for Flower's UI and API; Flower refuses to start without it unless told
    flower_basic_auth: SecretStr | None = None
    #: send Celery task events from the start. Off, workers send them only once Flower (or
    #: ``celery control enable_events``) asks: ``tierq flower`` does as it starts, Flower itself every
    #: 5 s. Events cost the fast path ~1.5 ms of latency and ~10% of a worker's CPU (docs/latency.md)
    task_events: bool = False

    #: log level for tierq, Celery and kombu
    log_level: str = "INFO"
    #: ``json`` off a terminal and ``console`` on one, unless set
    log_format: Literal["auto", "json", "console"] = "auto"
    #: put prompt and summary text in log lines (off: logs carry sizes and figures only)
    log_content: bool = False

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        return _check_scheme("TIERQ_BROKER_URL", value, BROKER_SCHEMES)

    @field_validator("result_backend")
    @classmethod
    def _backend_scheme(cls, value: str | None) -> str | None:
        return None if value is None else _check_scheme("TIERQ_RESULT_BACKEND", value, BACKEND_SCHEMES)

    def api_key(self) -> SecretStr | None:
        """The API key: ANTHROPIC_API_KEY, else the first line of TIERQ_ANTHROPIC_API_KEY_FILE."""
        if self.anthropic_api_key is not None:
            return self.anthropic_api_key
        if self.anthropic_api_key_file is not None:
            try:
                key = self.anthropic_api_key_file.read_text(encoding="utf-8").strip()
            except OSError:
                return None
            return SecretStr(key) if key else None
        return None

    @property
    def backend_url(self) -> str:
        """The result backend URL, falling back to the broker."""
        return self.result_backend or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; :class:`ConfigError` naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            str(err["msg"]).removeprefix("Value error, ")
            if str(err["msg"]).startswith("Value error, TIERQ_")
            else f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"settings: {problems}") from None


@lru_cache(maxsize=1)
def get_tier_table() -> TierTable:
    """The process's tier table, from settings, loaded once."""
    return load_tier_table(get_settings().tiers_file)
