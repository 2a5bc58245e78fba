"""``tierq doctor``: check what tierq needs, one verdict per line."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table

from tierq.contract.errors import TierqError

if TYPE_CHECKING:
    pass
from tierq.ops.commands._common import console, fail
from tierq.ops.commands.stats import STRAY_WHY, broker_counts

__all__ = ["FAIL", "NOTE", "OK", "STYLE", "WARN", "doctor"]


#: doctor's verdicts, worst last
OK, NOTE, WARN, FAIL = "ok", "note", "warn", "FAIL"


STYLE = {OK: "green", NOTE: "cyan", WARN: "yellow", FAIL: "bold red"}


def _redis_check(url: str) -> tuple[str, str]:
    import redis

    if not url.startswith(("redis://", "rediss://", "unix://")):
        return OK, "not Redis: not checked here"
    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        return FAIL, f"unreachable: {type(exc).__name__}"
    finally:
        client.close()
    return OK, "answers"


def doctor() -> None:
    """Check what tierq needs: broker, backend, Redis policy, the API and key, each tier's model and price."""
    import anthropic

    from tierq.core.settings import get_settings, get_tier_table
    from tierq.llm.caching import system_prompt_cache
    from tierq.llm.client import make_client
    from tierq.llm.models import DEPRECATED, model_status, served_models
    from tierq.llm.pricing import PRICES
    from tierq.ops.checks import redis_eviction_warning

    rows: list[tuple[str, str, str]] = []
    settings = get_settings()
    try:
        table_data = get_tier_table()
    except TierqError as exc:
        raise fail(str(exc)) from None
    rows.append(("broker", *_redis_check(settings.broker_url)))
    if settings.backend_url != settings.broker_url:
        rows.append(("result backend", *_redis_check(settings.backend_url)))
    if rows[0][1] == OK:
        warning = redis_eviction_warning(settings.broker_url)
        policy = "redis maxmemory-policy"
        rows.append((policy, WARN, warning) if warning else (policy, OK, "noeviction"))
        for queue, count in broker_counts(settings).stray.items():
            label = f"stray queue {queue}"
            rows.append(
                (label, WARN, f"{count} message(s): {STRAY_WHY[queue]}") if count else (label, OK, "empty")
            )
    where = settings.anthropic_base_url or "https://api.anthropic.com"
    api_ok = False
    if settings.api_key() is None and not settings.anthropic_base_url:
        rows.append(("API", FAIL, "no ANTHROPIC_API_KEY (or its _FILE), no ANTHROPIC_BASE_URL"))
    else:
        client = make_client(settings)
        try:
            client.with_options(timeout=5.0, max_retries=1).models.list(limit=1)
            rows.append(("API", OK, f"{where}: reachable, key accepted"))
            api_ok = True
        except anthropic.AuthenticationError:
            rows.append(("API", FAIL, f"{where}: the API key was rejected (401)"))
        except anthropic.APIError as exc:
            rows.append(("API", FAIL, f"{where}: {type(exc).__name__}"))
    models = served_models(list(table_data.tiers.values()))
    for model, names in models.items():
        label = f"model {model} ({', '.join(names)})"
        if api_ok:
            try:
                status = model_status(client, model)
                verdict = FAIL if status.blocking else WARN if status.lifecycle == DEPRECATED else OK
                rows.append((label, verdict, status.describe()))
            except anthropic.APIError as exc:
                rows.append((label, WARN, f"not checked: {type(exc).__name__}"))
        price = PRICES.get(model)
        if price is None:
            rows.append((f"price {model}", WARN, "not in tierq/llm/prices.toml: cost_usd will be null"))
        else:
            rows.append((f"price {model}", OK, f"${price.input:g} in / ${price.output:g} out per MTok"))
    if not settings.prompt_cache:
        rows.append(("prompt cache", NOTE, "off (TIERQ_PROMPT_CACHE=false)"))
    else:
        for tier in table_data.tiers.values():
            cached, why = system_prompt_cache(tier.model, tier.system_prompt)
            rows.append((f"prompt cache {tier.name}", OK if cached else NOTE, why))
    table = Table(title="tierq doctor")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for check, verdict, detail in rows:
        table.add_row(check, f"[{STYLE[verdict]}]{verdict}[/]", detail)
    console().print(table)
    if any(verdict == FAIL for _, verdict, _ in rows):
        raise typer.Exit(1)
