"""Tokenization and the extractive summary the simulator answers with.

A token is one word or one punctuation mark together with the whitespace before it, so the
tokens of a text join back into it. Input and output tokens are counted the same way.
The summary keeps the best-scoring quarter of the input's sentences (by word frequency) in
their original order, cut at ``max_tokens``; in a prompt that wraps its document in
``<document>`` tags, only the document is summarized and the rest steers the choice.
Everything here is deterministic.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

__all__ = ["count_tokens", "split_deltas", "split_sentences", "summarize", "tokenize"]

_TOKEN_RE = re.compile(r"\s*(?:\w+|[^\w\s])")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
#: a prompt that wraps its document in ``<document>`` tags: the rest of it is the instructions
_DOCUMENT_RE = re.compile(r"<document>(.*?)</document>", re.DOTALL)

_STOPWORDS_TEXT = """
    a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just me more
    most my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves
"""
#: Words too common to say what a sentence is about.
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())

#: Output tokens per streamed text delta, as the real API sends them (a few at a time).
MIN_DELTA_TOKENS = 1
MAX_DELTA_TOKENS = 4


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens: each word or punctuation mark with its leading whitespace."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """Return the number of tokens in ``text``."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (at ``.!?`` followed by whitespace, and at blank lines)."""
    sentences = (" ".join(part.split()) for part in _SENTENCE_SPLIT_RE.split(text))
    return [s for s in sentences if s]


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD_RE.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS]


def _select(sentences: list[str], instructions: str) -> list[str]:
    """Keep about a quarter of ``sentences`` (at least one), the best-scoring, in original order."""
    words = [_content_words(s) for s in sentences]
    frequency = Counter(w for ws in words for w in ws)
    top = max(frequency.values(), default=1)
    focus = set(_content_words(instructions))

    def score(i: int) -> float:
        ws = words[i]
        if not ws:
            return 0.0
        base = sum(frequency[w] / top for w in ws) / math.sqrt(len(ws))
        return base + sum(1.0 for w in ws if w in focus)

    keep = max(1, (len(sentences) + 2) // 4)
    ranked = sorted(range(len(sentences)), key=lambda i: (-score(i), i))[:keep]
    return [sentences[i] for i in sorted(ranked)]


def summarize(text: str, instructions: str = "", max_tokens: int = 1024) -> tuple[str, int, str]:
    """Summarize ``text`` extractively.

    Args:
        text: the document.
        instructions: optional focus hint; sentences sharing its words score higher.
        max_tokens: the output is cut after this many tokens.

    Returns:
        ``(summary, output_tokens, stop_reason)`` where ``stop_reason`` is ``"max_tokens"``
        when the summary was cut and ``"end_turn"`` otherwise.
    """
    wrapped = _DOCUMENT_RE.search(text)
    if wrapped is not None:
        outside = text[: wrapped.start()] + text[wrapped.end() :]
        instructions = f"{instructions} {outside}".strip()
        text = wrapped.group(1)
    sentences = split_sentences(text)
    if not sentences:
        return "", 0, "end_turn"
    tokens = tokenize(" ".join(_select(sentences, instructions)))
    stop_reason = "end_turn"
    if len(tokens) > max_tokens:
        tokens = tokens[: max(max_tokens, 0)]
        stop_reason = "max_tokens"
    return "".join(tokens), len(tokens), stop_reason


def split_deltas(text: str, seed: int = 0) -> list[tuple[str, int]]:
    """Split ``text`` into streamed deltas of 1-4 tokens each: ``[(delta_text, n_tokens), ...]``.

    The deltas join back into ``text`` (whitespace after the last token goes into the last delta);
    the split is the same for the same ``seed``.
    """
    tokens = tokenize(text)
    rng = random.Random(seed)
    deltas: list[tuple[str, int]] = []
    i = 0
    while i < len(tokens):
        n = min(rng.randint(MIN_DELTA_TOKENS, MAX_DELTA_TOKENS), len(tokens) - i)
        deltas.append(("".join(tokens[i : i + n]), n))
        i += n
    rest = text[sum(len(t) for t in tokens) :]
    if rest and deltas:
        last, n = deltas[-1]
        deltas[-1] = (last + rest, n)
    return deltas
