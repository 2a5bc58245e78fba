"""An Anthropic-compatible Messages API simulator: latency per model family, extractive summaries, faults.

Point the official SDK at it with ``base_url`` (or ``ANTHROPIC_BASE_URL``)::

    with SimServer(SimConfig(time_scale=0.01)) as sim:
        client = anthropic.Anthropic(api_key="sim-key", base_url=sim.url)
"""

from tierq.sim.app import create_app
from tierq.sim.config import SimConfig
from tierq.sim.server import SimServer, serve

__all__ = ["SimConfig", "SimServer", "create_app", "serve"]
