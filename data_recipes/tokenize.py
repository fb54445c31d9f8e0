"""Tokenization: train a sentencepiece BPE tokenizer, and tokenize sources into Megatron shards.

Tokenizer: BPE with byte fallback (no text is ever <unk>), identity normalization and whitespace
kept as is, so `decode(encode(doc)) == doc` for any document, code included. Ids are fixed:
unk=0, bos=1, eos=2 (the end-of-document token, EOD), pad=3.

Shards: documents are encoded by Ray tasks in batches, with a bounded number of tasks in flight
(memory stays flat on any corpus size), and written in their original order with Megatron's
`IndexedDatasetBuilder`, one sequence per document, each ending in EOD. A shard is written under
a temp prefix and renamed, so a shard under its final name is always complete.
"""

from __future__ import annotations

import heapq
import itertools
import os
import re
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOD_ID, PAD_ID = 0, 1, 2, 3
MAX_TASK_BYTES = 1 << 20
"""A tokenization task holds at most ~this much text, whatever docs_per_task says: sentencepiece
returns Python lists (~40 bytes per token), so a worker's peak memory is ~10x a task's text."""


# --------------------------------------------------------------------------------------------
# Training


def write_sample(texts_iters: list[Iterable[str]], path: str | os.PathLike,
                 sample_bytes: int) -> int:
    """Write up to `sample_bytes` of text, evenly over the sources, one line per sentence.

    Always draws the next document from the source with the fewest bytes so far, so a small
    source's unused share goes to the others. Returns the bytes written.
    """
    heap = [(0, i) for i in range(len(texts_iters))]  # (bytes so far, source index)
    iters = [iter(t) for t in texts_iters]
    total, full = 0, False
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        while heap and not full:
            taken, i = heapq.heappop(heap)
            doc = next(iters[i], None)
            if doc is None:
                continue  # source exhausted: it leaves the heap
            # the trainer reads one sentence per line, so newlines never reach it: "\n" is
            # always encoded as its byte-fallback piece <0x0A>
            for line in doc.split("\n"):
                n = len(line.encode("utf-8")) + 1
                if total + n > sample_bytes:
                    full = True
                    break
                if line.strip():
                    f.write(line + "\n")
                    taken, total = taken + n, total + n
            heapq.heappush(heap, (taken, i))
    return total


def train_from_sample(sample_path: str | os.PathLike, out_prefix: str | os.PathLike,
                      vocab_size: int, seed: int = 0, special_tokens: Sequence[str] = ()) -> str:
    """Train on a sample file; writes <out_prefix>.model/.vocab atomically, returns the model path."""
    out_prefix = str(out_prefix)
    tmp = f"{out_prefix}.partial"
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=str(sample_path), model_prefix=tmp, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOD_ID, pad_id=PAD_ID,
            # exact round trip: no unicode normalization, no whitespace collapsing
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # indentation runs become pieces
            split_digits=True,  # one token per digit: arithmetic stays learnable
            user_defined_symbols=list(special_tokens),  # always one token (chat markers)
            add_dummy_prefix=False,  # encode(a) + encode(b) == encode(a + b) at marker boundaries
            max_sentence_length=16384, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(_vocab_error(str(e), vocab_size, sample_path)) from None
    _normalize_model(tmp + ".model", out_prefix + ".model")
    os.replace(tmp + ".vocab", out_prefix + ".vocab")
    Path(tmp + ".model").unlink()
    return out_prefix + ".model"


def train_sentencepiece(texts_iters: list[Iterable[str]], out_prefix: str | os.PathLike,
                        vocab_size: int, seed: int = 0, sample_bytes: int = 5_000_000,
                        special_tokens: Sequence[str] = ()) -> str:
    """Sample text evenly from one iterator per source, train BPE; returns the .model path."""
    sample = f"{out_prefix}.sample.txt"
    try:
        write_sample(texts_iters, sample, sample_bytes)
        return train_from_sample(sample, out_prefix, vocab_size, seed, special_tokens)
    finally:
        Path(sample).unlink(missing_ok=True)


def _vocab_error(msg: str, vocab_size: int, sample_path) -> str:
    size = Path(sample_path).stat().st_size if Path(sample_path).exists() else 0
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return (f"vocab_size {vocab_size} is too large for the {size} bytes of sampled text: "
                f"use vocab_size <= {m.group(1)}, or give more text (sources / sample_bytes)")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return (f"vocab_size {vocab_size} is too small: the special and byte-fallback pieces plus "
                f"the sample's characters need at least {m.group(1)}")
    return f"sentencepiece training failed: {msg.strip().splitlines()[-1]}"


def _normalize_model(src: str, dst: str) -> None:
    """Drop run-specific trainer fields (temp paths, thread count) so the same text and settings
    give a byte-identical .model, whatever the machine: its sha256 can then be compared."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(src).read_bytes())
    for name in ("input", "model_prefix", "num_threads"):
        proto.trainer_spec.ClearField(name)
    tmp = dst + ".tmp"
    Path(tmp).write_bytes(proto.SerializeToString())
    os.replace(tmp, dst)


# --------------------------------------------------------------------------------------------
# Encoding (runs in Ray workers)

_PROCESSORS: dict[tuple, spm.SentencePieceProcessor] = {}
"""Per-process cache: a worker loads each tokenizer once, not once per task."""


def load_processor(model_path: str) -> spm.SentencePieceProcessor:
    """The processor for a .model file, cached per (path, mtime, size): a file rewritten in
    place (a retrained tokenizer in a long-lived worker) is loaded again."""
    st = os.stat(model_path)
    key = (str(model_path), st.st_mtime_ns, st.st_size)
    sp = _PROCESSORS.get(key)
    if sp is None:
        sp = _PROCESSORS[key] = spm.SentencePieceProcessor(model_file=str(model_path))
    return sp


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


_HF_TOKENIZERS: dict[tuple, object] = {}


def is_hf_tokenizer(model_path: str) -> bool:
    """An imported model's tokenizer.json (the `import` stage's manifest names it as model_file)."""
    return str(model_path).endswith(".json")


def load_hf_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json, cached per process like load_processor."""
    from tokenizers import Tokenizer

    st = os.stat(path)
    key = (str(path), st.st_mtime_ns, st.st_size)
    tok = _HF_TOKENIZERS.get(key)
    if tok is None:
        tok = _HF_TOKENIZERS[key] = Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
    return tok


def _hf_eod(path: str) -> int:
    """A tokenizer.json does not say which token ends a document: the import stage writes it
    beside it, in eod.json."""
    import json

    return json.loads((Path(path).parent / "eod.json").read_text())["eod_id"]


def vocab_size_of(model_path: str) -> int:
    """Token ids of a tokenizer range over [0, this): sentencepiece pieces or HF entries."""
    if is_hf_tokenizer(model_path):
        return load_hf_tokenizer(model_path).get_vocab_size(with_added_tokens=True)
    return load_processor(model_path).get_piece_size()


def encode_batch(model_path: str, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (all tokens, EOD after each, as one array; per-document lengths incl. EOD).

    `model_path`: a sentencepiece .model, or an imported model's tokenizer.json (encoded without
    its special-token template: no BOS, like sentencepiece here)."""
    if is_hf_tokenizer(model_path):
        tok = load_hf_tokenizer(model_path)
        ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
        eod = _hf_eod(model_path)
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


def init_ray() -> bool:
    """Connect to PIPELINE_RAY_ADDRESS or start a local Ray, unless one is up; True if started."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("PIPELINE_RAY_ADDRESS")
    ray.init(address=address or "local", num_cpus=None if address else os.cpu_count(),
             include_dashboard=False, logging_level="WARNING")
    return True


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
    # Ray runs tasks off the main thread; glibc then gives each thread its own malloc arena and
    # the freed token lists fragment them: measured 2x the worker memory without this cap
    encode = ray.remote(num_cpus=1, runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "2"}})(
        encode_batch)
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
