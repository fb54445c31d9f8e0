"""The document collection behind the `search` and `visit` tools: a jsonl corpus of
{id, title, text}, a BM25 index over it (bm25s), built once per corpus and cached on disk.

Deterministic: the same corpus file and parameters give the same index and the same ranking
(ties broken by corpus order), in-process, with no server. `python -m data_recipes.tools_mcp`
serves the same collection over MCP.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from data_recipes.prompt_files import jsonl_rows

STOPWORDS = "en"  # bm25s' English list; the index and the queries use the same tokenizer


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    preview: str
    score: float


def load_corpus(path: str | os.PathLike) -> list[Document]:
    """The documents of a jsonl corpus, in file order. ValueError naming `corpus` (and the line)
    for a missing file, a bad line or a repeated id."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"corpus: {path} does not exist")
    docs, seen = [], set()
    try:
        for where, row in jsonl_rows(path):
            if not all(isinstance(row.get(k), str) for k in ("id", "title", "text")):
                raise ValueError(f"{where}: needs string fields id, title, text")
            if row["id"] in seen:
                raise ValueError(f"{where}: id {row['id']!r} appears twice")
            seen.add(row["id"])
            docs.append(Document(row["id"], row["title"], row["text"]))
    except ValueError as e:
        raise ValueError(f"corpus: {e}") from None
    if not docs:
        raise ValueError(f"corpus: {path} has no documents")
    return docs


def tokenize(texts: list[str]) -> list[list[str]]:
    """bm25s' tokenizer (lowercase, words of 2+ characters, English stopwords, no stemming)."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def _index_key(corpus_path: Path, k1: float, b: float, method: str) -> str:
    """The cache key: the corpus bytes, the BM25 parameters and the bm25s version."""
    import bm25s

    h = hashlib.sha256()
    with open(corpus_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps([k1, b, method, STOPWORDS, bm25s.__version__]).encode())
    return h.hexdigest()[:16]


class Collection:
    """A corpus with its BM25 index: `search` ranks, `get` fetches a document by id."""

    def __init__(self, corpus_path: str | os.PathLike, index_dir: str | os.PathLike,
                 k1: float = 1.5, b: float = 0.75, method: str = "lucene"):
        import bm25s

        self.docs = load_corpus(corpus_path)
        self.by_id = {d.id: d for d in self.docs}
        # Lucene's BM25 (bm25s' default): what Pyserini/FlashRAG, Jan-nano's retriever, score with
        key = _index_key(Path(corpus_path), k1, b, method)
        self.index_path = Path(index_dir) / f"bm25-{key}"
        if (self.index_path / "done").is_file():
            self.bm25 = bm25s.BM25.load(str(self.index_path), show_progress=False)
            self.built = False
        else:
            self.bm25 = bm25s.BM25(k1=k1, b=b, method=method)
            self.bm25.index(tokenize([f"{d.title}\n{d.text}" for d in self.docs]),
                            show_progress=False)
            tmp = self.index_path.with_name(self.index_path.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.bm25.save(str(tmp), show_progress=False)
            (tmp / "done").write_text(str(len(self.docs)))
            try:  # another process may have finished the same index first: keep theirs
                tmp.rename(self.index_path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
            self.built = True

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query` (query words not in the corpus add 0)."""
        words = [w for w in tokenize([query])[0] if w in self.bm25.vocab_dict]
        if not words:
            return np.zeros(len(self.docs), dtype=np.float32)
        return self.bm25.get_scores(words)

    def search(self, query: str, top_k: int, preview_chars: int) -> list[Hit]:
        """The `top_k` best documents with a positive score, best first; equal scores keep corpus
        order (a stable sort of all scores: bm25s' own top-k leaves the order of ties open)."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [Hit(d.id, d.title, preview(d.text, preview_chars), float(scores[i]))
                for i in order if scores[i] > 0 for d in [self.docs[i]]]

    def get(self, doc_id: str) -> Optional[Document]:
        return self.by_id.get(doc_id)


def preview(text: str, max_chars: int) -> str:
    """The first `max_chars` characters on one line, cut at a word, with an ellipsis if cut."""
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[:max_chars].rsplit(" ", 1)[0] or flat[:max_chars]
    return cut + " ..."


def cut_to_budget(text: str, max_chars: Optional[int] = None,
                  count_tokens: Optional[Callable[[str], int]] = None,
                  max_tokens: Optional[int] = None) -> tuple[str, bool]:
    """(the longest prefix of `text` within the budget, whether it was cut). The budget is
    `max_chars` characters, or `max_tokens` as `count_tokens` counts them (the policy's own
    tokenizer), or both; the token cut is a binary search over prefix lengths."""
    out = text if max_chars is None else text[:max_chars]
    if count_tokens is not None and max_tokens is not None and count_tokens(out) > max_tokens:
        lo, hi = 0, len(out)  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count_tokens(out[:mid]) <= max_tokens else (lo, mid)
        out = out[:lo]
    return out, len(out) < len(text)
