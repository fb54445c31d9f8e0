"""The tokenizer a stage job encodes and decodes with, loaded from a tokenizer stage's manifest.

Every stage that turns text into tokens (SFT data, generation, eval) goes through `load_tokenizer`,
so a tokenizer trained by our `tokenizer` stage (sentencepiece) and one that came with an imported
model (`hf`: its tokenizer.json, written by the `import` stage) behave alike. The manifest says
which it is (`"format"`; sentencepiece when absent). Below them, the per-process caches of loaded
sentencepiece processors and HF tokenizers (a Ray worker loads each file once, not once per task).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_id(self, piece: str) -> int | None:
        """The id of a piece that is one token (a special token), or None if it is not one."""

    def piece(self, i: int) -> str:
        """The vocabulary entry of id i."""


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        self.model_file = model_file
        self.sp = load_processor(model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (an imported model's), through the `tokenizers` library.

    Text is encoded without the tokenizer's own special-token template (no BOS added), like
    our sentencepiece tokenizer: the stages add EOD and chat markers themselves. `vocab_size`
    is the model's embedding rows (the manifest's), which may exceed the tokenizer's entries.
    """

    def __init__(self, tokenizer_file: str, vocab_size: int, eod_id: int, pad_id: int):
        self.model_file = tokenizer_file
        self.tok = load_hf_tokenizer(tokenizer_file)
        self.vocab_size, self.eod_id, self.pad_id = vocab_size, eod_id, pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i) or ""


def load_tokenizer(manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer a tokenizer-producing stage's manifest describes."""
    fmt = manifest.get("format", "sentencepiece")
    if fmt == "sentencepiece":
        return SentencePieceTokenizer(manifest["model_file"])
    if fmt == "hf":
        return HFTokenizer(manifest["model_file"], manifest["vocab_size"], manifest["eod_id"],
                           manifest["pad_id"])
    raise ValueError(f"tokenizer format {fmt!r} is not supported (one of: sentencepiece, hf)")


def tokenizer_mismatch(a: Tokenizer, b: Tokenizer) -> str | None:
    """Why two tokenizers would not give the same ids for the same text, or None if they are the
    same model file (byte for byte: sentencepiece's merges are in it, not only the vocabulary)."""

    def digest(t: Tokenizer) -> str:
        return hashlib.sha256(Path(t.model_file).read_bytes()).hexdigest()

    if type(a) is type(b) and digest(a) == digest(b):
        return None
    if a.vocab_size != b.vocab_size:
        return f"vocab sizes differ ({a.vocab_size} vs {b.vocab_size})"
    for i in range(a.vocab_size):
        if a.piece(i) != b.piece(i):
            return f"token {i} differs ({a.piece(i)!r} vs {b.piece(i)!r})"
    if (a.eod_id, a.pad_id) != (b.eod_id, b.pad_id):
        return f"end-of-document/pad ids differ ({a.eod_id}/{a.pad_id} vs {b.eod_id}/{b.pad_id})"
    return "same vocabulary but different model files (merges or normalisation may differ)"


# --------------------------------------------------------------------------------------------
# Loading, cached per process

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


def hf_eod_id(path: str) -> int:
    """A tokenizer.json does not say which token ends a document: the import stage writes it
    beside it, in eod.json."""
    return json.loads((Path(path).parent / "eod.json").read_text())["eod_id"]


def vocab_size_of(model_path: str) -> int:
    """Token ids of a tokenizer range over [0, this): sentencepiece pieces or HF entries."""
    if is_hf_tokenizer(model_path):
        return load_hf_tokenizer(model_path).get_vocab_size(with_added_tokens=True)
    return load_processor(model_path).get_piece_size()
