"""``python -m tierq``: the ``tierq`` command."""

from tierq.ops.cli import main

main()
