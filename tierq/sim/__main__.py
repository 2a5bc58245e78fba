"""``python -m tierq.sim``: serve the simulator in the foreground, with the benchmark knobs.

``tierq sim`` covers everyday use; this entry point also exposes the latency overrides of
:class:`~tierq.sim.config.SimConfig` (jitter, fixed TTFT, fixed call duration)::

    python -m tierq.sim --port 8765 --fixed-total-s 0.5 --jitter 0
    python -m tierq.sim --limits rpm=50,itpm=30000,otpm=8000
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence

from tierq.sim.config import SimConfig
from tierq.sim.ratelimit import DEFAULT_LIMITS, Limits
from tierq.sim.server import serve

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, int, SimConfig]:
    """Parse the command line into ``(host, port, config)``."""
    parser = argparse.ArgumentParser(prog="python -m tierq.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies every model delay")
    parser.add_argument("--seed", type=int, default=None, help="seed for jitter and fault draws")
    parser.add_argument("--jitter", type=float, default=None, help="replace every model's jitter (0-1)")
    parser.add_argument("--fixed-ttft-s", type=float, default=None, help="fixed TTFT, seconds (not scaled)")
    parser.add_argument(
        "--fixed-total-s", type=float, default=None, help="fixed duration of a call, seconds (not scaled)"
    )
    parser.add_argument(
        "--limits",
        default=str(DEFAULT_LIMITS),
        help=f"per-model rate limits per minute, rpm=N,itpm=N,otpm=N (default {DEFAULT_LIMITS})",
    )
    args = parser.parse_args(argv)
    if args.time_scale < 0:
        parser.error("--time-scale must be >= 0")
    try:
        limits = Limits.parse(args.limits)
    except ValueError as exc:
        parser.error(f"--limits: {exc}")
    config = SimConfig(
        time_scale=args.time_scale,
        seed=args.seed,
        jitter=args.jitter,
        fixed_ttft_s=args.fixed_ttft_s,
        fixed_total_s=args.fixed_total_s,
        limits=limits,
    )
    return args.host, args.port, config


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted."""
    host, port, config = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        serve(host, port, config)


if __name__ == "__main__":
    main()
