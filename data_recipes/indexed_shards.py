"""Tokenize sources into Megatron shards (.bin/.idx), on Ray workers.

Documents are encoded by Ray tasks in batches, with a bounded number of tasks in flight (memory
stays flat on any corpus size), and written in their original order with Megatron's
`IndexedDatasetBuilder`, one sequence per document, each ending in EOD. A shard is written under
a temp prefix and renamed, so a shard under its final name is always complete.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from data_recipes.ray_tasks import init_ray
from data_recipes.tokenizer_loading import (hf_eod_id, is_hf_tokenizer, load_hf_tokenizer,
                                            load_processor, vocab_size_of)

MAX_TASK_BYTES = 1 << 20
"""A tokenization task holds at most ~this much text, whatever docs_per_task says: sentencepiece
returns Python lists (~40 bytes per token), so a worker's peak memory is ~10x a task's text."""


# --------------------------------------------------------------------------------------------
# Encoding (runs in Ray workers)


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


def encode_batch(model_path: str, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (all tokens, EOD after each, as one array; per-document lengths incl. EOD).

    `model_path`: a sentencepiece .model, or an imported model's tokenizer.json (encoded without
    its special-token template: no BOS, like sentencepiece here)."""
    if is_hf_tokenizer(model_path):
        tok = load_hf_tokenizer(model_path)
        ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
        eod = hf_eod_id(model_path)
    else:
        sp = load_processor(model_path)
        ids = sp.encode(docs, num_threads=1)  # one task per core already: no threads inside a task
        eod = sp.eos_id()
    for doc in ids:
        doc.append(eod)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), token_dtype(vocab_size_of(model_path)),
                         count=int(lengths.sum()))
    return tokens, lengths


# --------------------------------------------------------------------------------------------
# Shards


def _batches(documents: Iterable[str], docs_per_task: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= docs_per_task or size >= MAX_TASK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_source_to_indexed(documents: Iterable[str], tokenizer_model_path: str,
                               out_prefix: str | os.PathLike, docs_per_task: int = 512,
                               progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Tokenize documents on Ray into <out_prefix>.bin/.idx; returns {documents, tokens}.

    progress(documents, tokens) is called after every written batch; it may raise (e.g. to stop
    for preemption): the partial shard is then removed and the exception propagates.
    """
    import ray
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    init_ray()
    model_path = str(Path(tokenizer_model_path).resolve())
    dtype = token_dtype(vocab_size_of(model_path))
    out_prefix, tmp = str(out_prefix), f"{out_prefix}.partial"
    # the workers' malloc arenas are capped on the whole cluster (ray_tasks.WORKER_ENV)
    encode = ray.remote(num_cpus=1)(encode_batch)
    # two tasks per core: workers never wait on the writer, and memory stays bounded
    max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    pending: deque = deque()
    n_docs = n_tokens = 0

    def write_one() -> None:
        nonlocal n_docs, n_tokens
        tokens, lengths = ray.get(pending.popleft())
        ends = np.cumsum(lengths)
        for start, end in zip(ends - lengths, ends):  # one Megatron document per source document
            builder.add_document(tokens[start:end], [int(end - start)])
        n_docs += len(lengths)
        n_tokens += int(ends[-1])
        if progress is not None:
            progress(n_docs, n_tokens)

    try:
        for batch in _batches(documents, docs_per_task):
            pending.append(encode.remote(model_path, batch))
            if len(pending) >= max_in_flight:
                write_one()
        while pending:
            write_one()
        builder.finalize(tmp + ".idx")
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(tmp + ext).unlink(missing_ok=True)
        raise
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")
    return {"documents": n_docs, "tokens": n_tokens}
