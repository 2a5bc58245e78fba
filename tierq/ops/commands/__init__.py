"""The ``tierq`` commands, one module per group; :mod:`tierq.ops.cli` assembles them."""
