"""The corpus of `mix(...)` data: documents of several corpora interleaved by shares of text.

`mixed_corpus(parts)` writes `<cache>/mixed/<key>/corpus.jsonl`: documents are taken in each
corpus's own order, the next one always from the corpus furthest below its share of the
characters written so far (ties: the one named first), until the corpus due next runs out. So
the mixture holds every corpus in its share to within one document, is the same file on every
run (the key covers each corpus's content fingerprint and the shares), and its size is set by
the corpus that runs out first relative to its share. Interleaving (not concatenating) keeps the
shares in every window of the training order and in the held-out tail a stage splits off.
Characters stand in for tokens: the shares are exact in text, close in tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from pdc.files import sha256_json, write_text
from pdc.inputs.cache import cache_root

FORMAT = "mixed-chars-v1"
CORPUS = "corpus.jsonl"


def interleave(corpora: list[list[str]], shares: list[float]) -> list[str]:
    """The documents of `corpora` interleaved by `shares` of characters (rule above)."""
    taken, chars, out = [0] * len(corpora), [0] * len(corpora), []
    while True:
        due = min(range(len(corpora)), key=lambda i: (chars[i] / shares[i], i))
        if taken[due] == len(corpora[due]):
            return out
        doc = corpora[due][taken[due]]
        taken[due] += 1
        chars[due] += max(len(doc), 1)
        out.append(doc)


def mixed_corpus(parts: list[tuple[str, list[str], float]], fingerprints: list[str]) -> Path:
    """The JSONL file of the mixture of `parts` ((name, documents, share)), whose contents have
    the identities `fingerprints`; written once."""
    key = sha256_json([FORMAT, [[fp, share] for fp, (_, _, share) in zip(fingerprints, parts)]])[:24]
    path = cache_root() / "mixed" / key / CORPUS
    if not path.exists():
        docs = interleave([d for _, d, _ in parts], [s for _, _, s in parts])
        write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path
