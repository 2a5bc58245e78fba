"""Deterministic documents to summarize, of a chosen size.

The simulator's summary keeps about a quarter of a document's sentences, so a document of ``n``
sentences of ~16 words yields a reply of about ``4 * n`` output tokens (before the tier's cap).
"""

from __future__ import annotations

import random

__all__ = ["make_doc"]

_SUBJECTS = (
    "The billing service", "Each regional team", "The storage cluster", "Our on-call engineer",
    "The new ingestion pipeline", "The customer portal", "The quarterly audit", "The search index",
    "The mobile release", "The data warehouse", "The incident review", "The support queue",
)  # fmt: skip
_VERBS = (
    "reduced", "doubled", "delayed", "replaced", "measured", "reviewed", "migrated", "stabilised",
    "documented", "scheduled", "prioritised", "simplified",
)  # fmt: skip
_OBJECTS = (
    "the nightly batch jobs", "its error budget", "the retry policy for payments", "latency at the p99",
    "the cost of cold storage", "the rollout of feature flags", "access reviews for contractors",
    "the backlog of low urgency tickets", "capacity planning for next year", "the schema of event logs",
)  # fmt: skip
_TAILS = (
    "after the outage in March", "without any customer impact", "ahead of the holiday peak",
    "as the service level objective required", "while traffic grew by a third",
    "once the vendor contract was renewed", "because alerts had become noisy",
)  # fmt: skip


def make_doc(sentences: int, seed: int = 0) -> str:
    """A plausible report of ``sentences`` sentences, in paragraphs of six; the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(sentences):
        sentence = (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        )
        out.append(sentence + ("\n\n" if i % 6 == 5 else " "))
    return "".join(out).strip()
