"""``python -m bench SCENARIO [--runs N] [--quick] [--json PATH] [--png PATH]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.procs import handle_sigterm, interrupted
from bench.report import RESULTS_DIR, console, environment, print_environment, print_result, write_json
from bench.result import Options, ScenarioResult

__all__ = ["main"]

_NAMES = ("overhead", "isolation", "streaming", "concurrency", "cost")
#: run only when named (not by ``all``): ``http``, the HTTP API against Python's submit();
#: ``ratelimit``, the shared rate limit under a slow burst (minutes long); ``dollars``, what a mix
#: costs with and without batches and the prompt cache (four deployments in turn)
_EXTRA = ("http", "ratelimit", "dollars")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="tierq benchmarks (see bench/__init__.py)"
    )
    parser.add_argument("scenario", choices=[*_NAMES, *_EXTRA, "all"])
    parser.add_argument(
        "--runs", type=int, default=None, help="runs to take medians over (default per scenario)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny version, seconds per scenario")
    parser.add_argument(
        "--json", type=Path, default=None, help="JSON output (default bench/results/NAME.json)"
    )
    parser.add_argument("--png", type=Path, default=None, help="plot (default bench/results/NAME.png)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def _run_one(name: str, harness: Any, options: Options) -> ScenarioResult:
    from bench.scenarios import SCENARIOS

    title, run = SCENARIOS[name]
    started = time.monotonic()
    try:
        result = run(harness, options)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one scenario failing must not lose the others' results
        harness.failed = True
        result = ScenarioResult(name, title, skipped=f"failed: {type(exc).__name__}: {exc}")
    result.elapsed_s = time.monotonic() - started
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario(s); print, write JSON and PNG. Exit status 1 if a scenario failed."""
    args = _parse(argv)
    options = Options(runs=args.runs, quick=args.quick)
    names = list(_NAMES) if args.scenario == "all" else [args.scenario]
    out = console()
    env = environment()
    print_environment(out, env)
    from bench.harness import Harness

    results: list[ScenarioResult] = []
    try:
        with handle_sigterm(), Harness(keep_logs=args.keep_logs) as harness:
            for name in names:
                out.print(f"[dim]running {name}{' (quick)' if options.quick else ''}...[/]")
                result = _run_one(name, harness, options)
                results.append(result)
                print_result(out, result)
    except KeyboardInterrupt:
        interrupt = True
    else:
        # a signal whose KeyboardInterrupt Python swallowed (raised in a __del__) still stops the run
        interrupt = interrupted()
    if interrupt:
        out.print("[yellow]interrupted: every process the bench started has been stopped[/]")
        return 130
    document: dict[str, Any]
    if args.scenario == "all":
        document = {
            "environment": env,
            "options": vars(options),
            "scenarios": {r.scenario: r.as_dict() for r in results},
        }
    else:
        document = {"environment": env, "options": vars(options), **results[0].as_dict()}
    json_path = args.json or RESULTS_DIR / f"{args.scenario}.json"
    png_path = args.png or RESULTS_DIR / f"{args.scenario}.png"
    write_json(json_path, document)
    from bench.plot import save_figure

    save_figure(results, png_path)
    out.print(f"wrote {json_path} and {png_path}")
    return 1 if any(r.skipped and r.skipped.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
