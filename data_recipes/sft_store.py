"""The SFT store: conversations as token ids + loss mask on disk, memory-mapped by the SFT job.

A shard at `<prefix>` is two of Megatron's indexed datasets (megatron.core.datasets.indexed_dataset)
with one sequence per conversation and the same lengths:
  <prefix>.bin/.idx        token ids (uint16 below 65,500 entries, else int32)
  <prefix>.mask.bin/.idx   the loss mask (uint8: 1 = an assistant token, trained on)
and `<prefix>.done.json`, written after both are renamed into place (counts, sizes, checksums, the
tokenizer's sha256), so a shard with a matching done-record is complete and a rerun skips it.

Why Megatron's format rather than our own memory-mapped arrays: `prepare` already writes it (one
writer, one reader, one set of tools for both); its .idx holds every sequence's length as one int32
array that is read without touching the tokens, which is exactly what packing needs (the plan is
made from the lengths alone); its reader memory-maps both files; and the token half is a plain
Megatron dataset any Megatron tool reads. A format of our own would be the same arrays plus an
offsets file, with nothing gained.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from data_recipes.chat import SPECIAL_TOKENS, Message, render_turn
from data_recipes.tokenizer_loading import HFTokenizer, SentencePieceTokenizer

MASK_SUFFIX = ".mask"
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


# --------------------------------------------------------------------------------------------
# Encoding


def batch_encode(tok, texts: list[str]) -> list[list[int]]:
    """Many texts in one call to the tokenizer's C++ batch encoder (one thread: a worker owns a
    core); the same ids as `tok.encode` one by one."""
    if isinstance(tok, SentencePieceTokenizer):
        return tok.sp.encode(texts, num_threads=1)
    if isinstance(tok, HFTokenizer):
        return [e.ids for e in tok.tok.encode_batch(texts, add_special_tokens=False)]
    return [tok.encode(t) for t in texts]


def encode_conversations(tok, conversations: list[list[Message]], thinking: str = "on"
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """data_recipes.chat.encode_chat of many conversations at once -> (tokens, mask, lengths),
    the conversations end to end. The text between markers of all of them is encoded in one batch
    call (distinct pieces once: headers and newlines repeat), which is what brings the tokenize
    stage near the tokenizer's raw speed; ids and mask equal encode_chat's (tested)."""
    special = {}
    for t in SPECIAL_TOKENS:
        special[t] = tok.token_id(t)
        if special[t] is None:
            raise ValueError(f"the tokenizer has no {t!r} token: train it with the chat special "
                             "tokens (tokenizer stage `special_tokens`)")
    pieces: dict[str, int] = {}
    plans = []  # per conversation: (special id or -1, piece index, trained) per piece
    for conv in conversations:
        plan = []
        for m in conv:
            header, body = render_turn(m, thinking)
            for text, trained in ((header, 0), (body, int(m.role == "assistant")), ("\n", 0)):
                for piece in _SPLIT.split(text):
                    if piece in special:
                        plan.append((special[piece], -1, trained))
                    elif piece:
                        plan.append((-1, pieces.setdefault(piece, len(pieces)), trained))
        plans.append(plan)
    encoded = batch_encode(tok, list(pieces))
    ids: list[int] = []
    mask: list[int] = []
    lengths = np.zeros(len(plans), np.int64)
    for c, plan in enumerate(plans):
        start = len(ids)
        for sid, j, trained in plan:
            if sid >= 0:
                ids.append(sid)
                mask.append(trained)
            else:
                ids.extend(encoded[j])
                mask.extend([trained] * len(encoded[j]))
        lengths[c] = len(ids) - start
    return np.asarray(ids, np.int64), np.asarray(mask, np.uint8), lengths


# --------------------------------------------------------------------------------------------
# Writing and reading shards


class ShardWriter:
    """Writes one shard under a temp prefix; `finish()` renames it into place, `abort()` removes
    it."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.tmp = str(prefix), f"{prefix}.partial"
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tokens = IndexedDatasetBuilder(self.tmp + ".bin", dtype=token_dtype(vocab_size))
        self.mask = IndexedDatasetBuilder(self.tmp + MASK_SUFFIX + ".bin", dtype=np.uint8)
        self.conversations = self.n_tokens = self.trained_tokens = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """Conversations laid end to end (encode_conversations' result)."""
        for builder, values in ((self.tokens, tokens), (self.mask, mask)):
            _add_documents(builder, values, lengths)
        self.conversations += len(lengths)
        self.n_tokens += int(lengths.sum())
        self.trained_tokens += int(mask.sum())

    def finish(self) -> dict[str, Any]:
        self.tokens.finalize(self.tmp + ".idx")
        self.mask.finalize(self.tmp + MASK_SUFFIX + ".idx")
        for part in shard_files(""):
            os.replace(self.tmp + part, self.prefix + part)
        return {"conversations": self.conversations, "tokens": self.n_tokens,
                "trained_tokens": self.trained_tokens, "files": file_sizes(self.prefix)}

    def abort(self) -> None:
        for builder in (self.tokens, self.mask):
            builder.data_file.close()
        for part in shard_files(""):
            Path(self.tmp + part).unlink(missing_ok=True)


def _add_documents(builder, values: np.ndarray, lengths: np.ndarray) -> None:
    """`builder.add_document(doc, [len(doc)])` for every document of `values` at once: one write
    and two list extends per batch instead of per conversation (that loop was ~2/3 of the writing
    process's CPU time). The same three fields add_document and Megatron's add_index update."""
    builder.data_file.write(np.ascontiguousarray(values, dtype=builder.dtype).tobytes(order="C"))
    builder.sequence_lengths.extend(lengths.tolist())
    n = len(builder.sequence_lengths)
    builder.document_indices.extend(range(n - len(lengths) + 1, n + 1))


def shard_files(prefix: str) -> list[str]:
    return [f"{prefix}{m}.{ext}" for m in ("", MASK_SUFFIX) for ext in ("bin", "idx")]


def file_sizes(prefix: str) -> dict[str, int]:
    return {part: os.path.getsize(prefix + part) for part in shard_files("")}


def shard_complete(prefix: str, record: dict | None) -> bool:
    """The shard's files are all there with the sizes its done-record says."""
    if not record:
        return False
    try:
        return file_sizes(prefix) == record.get("files")
    except OSError:
        return False


def write_shard(prefix: str | os.PathLike, tok, conversations: Iterable[list[Message]],
                thinking: str = "on", batch: int = 256) -> dict[str, Any]:
    """Encode conversations in this process into one shard (small sets: sft_data's samples)."""
    writer = ShardWriter(prefix, tok.vocab_size)
    try:
        chunk: list[list[Message]] = []
        for conv in conversations:
            chunk.append(conv)
            if len(chunk) >= batch:
                writer.add(*encode_conversations(tok, chunk, thinking))
                chunk = []
        if chunk:
            writer.add(*encode_conversations(tok, chunk, thinking))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


class SFTStore:
    """Shards read as one sequence of conversations: `lengths` (from the .idx files alone) and
    `store[i] -> (token ids, loss mask)`, both memory-mapped, never loaded whole."""

    def __init__(self, prefixes: list[str]):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.parts = [(IndexedDataset(p, mmap=True), IndexedDataset(p + MASK_SUFFIX, mmap=True))
                      for p in prefixes]
        sizes = [len(t) for t, _ in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.lengths = (np.concatenate([t.sequence_lengths for t, _ in self.parts])
                        if self.parts else np.zeros(0, np.int32))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        tokens, mask = self.parts[part]
        j = int(i - self.offsets[part])
        return tokens[j], mask[j]


# --------------------------------------------------------------------------------------------
# Tokenizing a conversation dataset into shards, on Ray


def encode_records(tokenizer_manifest: dict, fmt: str, fields: dict[str, str], thinking: str,
                   origin, numbers: list[int], payloads: list) -> tuple:
    """(tokens, mask, lengths, errors) of a batch of raw records (runs in a Ray worker): each is
    parsed, turned into messages, and the good ones encoded together; a bad one becomes an error
    line `place: what is wrong`."""
    from data_recipes.conversations import BadRecord, parse_payload, to_messages
    from data_recipes.tokenizer_loading import load_tokenizer

    tok = load_tokenizer(tokenizer_manifest)
    conversations, errors = [], []
    for n, payload in zip(numbers, payloads):
        try:
            conversations.append(to_messages(parse_payload(payload), fmt, fields))
        except BadRecord as e:
            errors.append(f"{origin.place(n)}: {e}")
    tokens, mask, lengths = encode_conversations(tok, conversations, thinking)
    return tokens.astype(token_dtype(tok.vocab_size)), mask, lengths, errors


def _tasks(records, records_per_task: int):
    """Raw records -> (origin, numbers, payloads) batches, one origin (file) per batch."""
    origin, numbers, payloads = None, [], []
    for o, n, payload in records:
        if (o != origin or len(numbers) >= records_per_task) and numbers:
            yield origin, numbers, payloads
            numbers, payloads = [], []
        origin = o
        numbers.append(n)
        payloads.append(payload)
    if numbers:
        yield origin, numbers, payloads


def tokenize_shard(encode, records, args: tuple, prefix: str, vocab_size: int,
                   records_per_task: int, max_in_flight: int, progress=None) -> dict[str, Any]:
    """One shard's records through Ray tasks (a bounded window, written in order) into
    <prefix>; returns its counts and error lines. On any exception the partial shard is removed."""
    import ray
    from collections import deque

    writer = ShardWriter(prefix, vocab_size)
    pending: deque = deque()
    errors: list[str] = []
    n_records = 0

    def write_one() -> None:
        tokens, mask, lengths, bad = ray.get(pending.popleft())
        writer.add(tokens, mask, lengths)
        errors.extend(bad)
        if progress is not None:
            progress(writer.conversations + len(errors), writer.n_tokens)

    try:
        for origin, numbers, payloads in _tasks(records, records_per_task):
            n_records += len(numbers)
            pending.append(encode.remote(*args, origin, numbers, payloads))
            if len(pending) >= max_in_flight:
                write_one()
        while pending:
            write_one()
        done = writer.finish()
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        writer.abort()
        raise
    return {**done, "records": n_records, "malformed": len(errors), "errors": errors}


def tokenize_dataset(cfg, tokenizer_manifest: dict, tokenizer_sha: str, store_dir: Path,
                     records_per_shard: int, records_per_task: int, thinking: str = "on",
                     progress=None) -> dict:
    """A conversation dataset (data_recipes.conversations.ConversationsConfig) into shards
    `<store_dir>/<name>-NNNNN` of `records_per_shard` records each, Ray-parallel. Resumable per
    shard: one whose done-record matches its files, the tokenizer and the input files is skipped.
    Returns the dataset's entry of the store manifest (shards, counts, malformed records)."""
    import itertools

    import ray

    from data_recipes.conversations import input_fingerprint, iter_raw
    from data_recipes.ray_tasks import init_ray
    from data_recipes.tokenizer_loading import load_tokenizer

    init_ray()
    vocab_size = load_tokenizer(tokenizer_manifest).vocab_size
    # the workers' malloc arenas are capped on the whole cluster (ray_tasks.WORKER_ENV)
    encode = ray.remote(num_cpus=1)(encode_records)
    max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    args = (tokenizer_manifest, cfg.format, dict(cfg.fields), thinking)
    key = {"tokenizer_sha256": tokenizer_sha, "thinking": thinking,
           "inputs": input_fingerprint(cfg),
           "format": cfg.format, "fields": dict(cfg.fields), "records_per_shard": records_per_shard}
    records = iter_raw(cfg)
    shards = []
    for k in itertools.count():
        prefix = str(store_dir / f"{cfg.name}-{k:05d}")
        head = list(itertools.islice(records, 1))
        if not head:
            break
        part = itertools.chain(head, itertools.islice(records, records_per_shard - 1))
        record = read_record(f"{prefix}.done.json")
        if shard_complete(prefix, record) and record.get("key") == key:
            for _ in part:  # skipped without parsing: a jsonl line is not even decoded
                pass
            print(f"{cfg.name} shard {k}: done earlier ({record['conversations']} "
                  "conversations), skipping", flush=True)
        else:
            Path(f"{prefix}.done.json").unlink(missing_ok=True)
            record = {"key": key, **tokenize_shard(encode, part, args, prefix, vocab_size,
                                                    records_per_task, max_in_flight, progress)}
            write_record(f"{prefix}.done.json", record)
        shards.append((prefix, record))
    total = {k: sum(r[k] for _, r in shards)
             for k in ("records", "conversations", "tokens", "trained_tokens", "malformed")}
    return {"name": cfg.name, "shards": [p for p, _ in shards], **total,
            "errors": [e for _, r in shards for e in r["errors"]]}


def read_record(path: str) -> dict | None:
    """A done-record, or None if it is missing or cut short."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_record(path: str, record: dict) -> None:
    """Written to a temp name, fsynced, renamed: a done-record is whole or absent."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_from_samples(data_path: str | os.PathLike, prefix: str | os.PathLike, name: str, tok,
                       tokenizer_sha: str, thinking: str = "on") -> dict:
    """sft_data's samples (`{"id", "messages"}` lines) as one shard at `prefix`, unless it is
    there already for this data, tokenizer and thinking mode; returns the store-manifest entry."""
    import hashlib

    h = hashlib.sha256()
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    key = {"tokenizer_sha256": tokenizer_sha, "thinking": thinking, "data_sha256": h.hexdigest()}
    prefix = str(prefix)
    record = read_record(f"{prefix}.done.json")
    if not (shard_complete(prefix, record) and record.get("key") == key):
        Path(f"{prefix}.done.json").unlink(missing_ok=True)

        def conversations():
            with open(data_path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield [Message(**m) for m in json.loads(line)["messages"]]

        record = {"key": key, **write_shard(prefix, tok, conversations(), thinking)}
        write_record(f"{prefix}.done.json", record)
    return {"name": name, "shards": [prefix], "records": record["conversations"], "malformed": 0,
            **{k: record[k] for k in ("conversations", "tokens", "trained_tokens")}}
