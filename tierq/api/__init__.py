"""The HTTP front door, ``tierq api``: submit, read, stream and cancel jobs over HTTP (docs/http.md).

A thin layer over the producer API (:mod:`tierq`), one layer above it: it imports ``tierq``,
``tasks`` and the store, observe and core layers, never the Celery wiring, the runtime or the SDK
except through ``tierq``.

    app = make_api(Producer(settings), load_tokens(Path("api-tokens.toml")))
"""

from tierq.api.app import make_api
from tierq.api.auth import ANONYMOUS, TokenTable, hash_token, load_tokens

__all__ = ["ANONYMOUS", "TokenTable", "hash_token", "load_tokens", "make_api"]
