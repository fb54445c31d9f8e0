"""Train a sentencepiece BPE tokenizer on an even sample of the sources.

BPE with byte fallback (no text is ever <unk>), identity normalization and whitespace kept as is,
so `decode(encode(doc)) == doc` for any document, code included. Ids are fixed: unk=0, bos=1,
eos=2 (the end-of-document token, EOD), pad=3. The same text and settings give a byte-identical
.model on any machine.
"""

from __future__ import annotations

import heapq
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

UNK_ID, BOS_ID, EOD_ID, PAD_ID = 0, 1, 2, 3


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
