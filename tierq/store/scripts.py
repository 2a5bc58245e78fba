"""The Lua scripts tierq runs in Redis: one ``.lua`` file each in ``lua/`` beside this module, read
on first use and kept (dramatiq's ``brokers/redis/*.lua``)."""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["lua"]


@cache
def lua(*names: str) -> str:
    """The text of ``lua/<name>.lua`` for each name, joined in order (a shared prelude first).

    Whole-line ``--`` comments (what the files say of KEYS and ARGV) are left out: some scripts are
    sent with every EVAL in a pipeline, and their bytes are paid on every call.
    """
    folder = resources.files("tierq.store").joinpath("lua")
    lines = [
        line
        for name in names
        for line in folder.joinpath(f"{name}.lua").read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("--")
    ]
    return "\n".join(lines) + "\n"
