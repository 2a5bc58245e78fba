"""``python -m worker``: the ``tierq`` command."""

from worker.ops.cli import main

main()
