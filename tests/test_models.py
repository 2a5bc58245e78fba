"""The product's model facts against the simulator's catalogue and the SDK's model list.

``tierq/llm/prices.toml`` (what tierq bills) and ``tierq/sim/catalogue.toml`` (what the simulated API
knows) are written independently on purpose; these tests are where they must agree.
"""

from __future__ import annotations

from typing import get_args

import pytest
from anthropic.types import Model

from tierq.contract.tiers import load_tier_table
from tierq.llm.pricing import PRICES
from tierq.sim.catalogue import load_catalogue

CATALOGUE = load_catalogue()


def test_every_priced_model_costs_what_the_catalogue_says() -> None:
    checked = 0
    for price in PRICES.price:
        entry = CATALOGUE.get(price.id)
        assert entry is not None, f"{price.id} is priced but not in the catalogue"
        for field in (
            "input",
            "output",
            "cache_write_5m",
            "cache_write_1h",
            "cache_read",
            "min_cacheable_tokens",
        ):
            assert getattr(price, field) == getattr(entry, field), f"{price.id}.{field}"
        checked += 1
    assert checked >= 20


def test_every_active_or_deprecated_model_has_a_price() -> None:
    callable_models = {e.id for e in CATALOGUE if e.lifecycle != "retired"}
    assert callable_models - {p.id for p in PRICES.price} == set()


@pytest.mark.parametrize("tier", ["fast", "standard", "slow"])
def test_built_in_tiers_run_current_priced_models(tier: str) -> None:
    model = load_tier_table(None).tiers[tier].model
    entry = CATALOGUE.resolve(model)
    assert entry is not None and entry.lifecycle == "active", model
    assert PRICES.get(model) is not None


def test_built_in_tiers_ask_for_effort_only_where_the_model_takes_it() -> None:
    for tier in load_tier_table(None).tiers.values():
        entry = CATALOGUE.resolve(tier.model)
        assert entry is not None
        assert tier.effort is None or entry.effort, f"{tier.name}: {tier.model} takes no effort"


def test_the_sdk_knows_every_model_a_tier_runs() -> None:
    known = set(get_args(get_args(Model)[0]))
    for tier in load_tier_table(None).tiers.values():
        assert tier.model in known, tier.model
