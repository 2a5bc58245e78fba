"""``python -m worker``: the ``tierq`` command."""

from worker.cli import main

main()
