"""The simulator's own tests: each module runs a simulator of its own (its ``sim_config``), driven
over HTTP by the real ``anthropic`` SDK (never patched)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from tests.helpers import SIM_TODAY
from tierq.sim import SimConfig, SimServer


@pytest.fixture(scope="module")
def sim_config() -> SimConfig:
    """What this module's simulator runs with (a module overrides it)."""
    return SimConfig(time_scale=0.01, seed=7, stall_s=2.0, today=SIM_TODAY)


@pytest.fixture(scope="module")
def sim(sim_config: SimConfig) -> Iterator[SimServer]:
    with SimServer(sim_config) as server:
        yield server


@pytest.fixture(scope="module")
def client(sim: SimServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="sim-key", base_url=sim.url, max_retries=0) as sdk:
        yield sdk
