"""Data sources: where documents come from, one config dataclass per kind.

A recipe names sources (`sources.<name>: {kind: jsonl, paths: [...]}`); the driver validates them
against these classes and resolves them into the stage spec; a stage job streams their documents
with `iter_documents(source_dict)`. Every reader streams (one file, row group or line at a time),
so memory stays flat whatever the corpus size. Order is deterministic: directories are walked in
sorted order, so a rerun yields the same documents in the same order.

Torch-free and light at import time: the driver imports this module to validate recipes, so
`datasets` and `pyarrow` are imported inside the readers that need them.
"""

from __future__ import annotations

import ast
import gzip
import itertools
import json
import os
import sysconfig
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional

from data_recipes.arithmetic import check_ops, iter_arithmetic_documents
from data_recipes.config_fields import added
from data_recipes.recall import check_pairs, recall_documents

MISSING: Any = "???"  # OmegaConf's marker for a value the recipe must give


@dataclass
class TextSource:
    """Plain text files (or directories of them, searched recursively)."""

    kind: str = "text"
    paths: list[str] = MISSING
    """Files or directories; a directory contributes every file matching `pattern` below it."""
    pattern: str = "*.txt"
    split: str = "file"
    """file: one document per file; paragraph: one document per blank-line separated block."""
    quality: str = "general"
    """Quality tier label carried into the prepare manifest (mixtures pick tiers per phase)."""
    max_docs: Optional[int] = None
    """Stop after this many documents (None: all)."""

    def __post_init__(self):
        _check_choice("split", self.split, ("file", "paragraph"))


@dataclass
class JsonlSource:
    """JSON lines files (optionally .gz); one document per line, taken from `field`."""

    kind: str = "jsonl"
    paths: list[str] = MISSING
    pattern: str = "*.jsonl*"
    """Files a directory in `paths` contributes (matches .jsonl and .jsonl.gz)."""
    field: str = "text"
    quality: str = "general"
    max_docs: Optional[int] = None


@dataclass
class ParquetSource:
    """Parquet files, read in row-group batches (never a whole file at once)."""

    kind: str = "parquet"
    paths: list[str] = MISSING
    pattern: str = "*.parquet"
    column: str = "text"
    quality: str = "general"
    max_docs: Optional[int] = None


@dataclass
class HFSource:
    """A Hugging Face dataset, streamed (`datasets.load_dataset(..., streaming=True)`).

    `name` is a hub id (needs network) or a builder such as "json"/"parquet" with local
    `data_files`, or a local directory of data files.
    """

    kind: str = "hf"
    name: str = MISSING
    config: Optional[str] = None
    """The dataset's configuration (subset) name, if it has several."""
    split: str = "train"
    field: str = "text"
    data_files: Optional[list[str]] = None
    """Passed through to load_dataset: a subset of the hub files, or local files for "json"."""
    quality: str = "general"
    max_docs: Optional[int] = None


@dataclass
class StdlibSource:
    """The Python standard library's own text, an offline corpus present on every machine."""

    kind: str = "stdlib"
    part: str = "code"
    """code: each .py file's contents; docstrings: each module's docstrings, joined."""
    quality: str = "general"
    max_docs: Optional[int] = None

    def __post_init__(self):
        _check_choice("part", self.part, ("code", "docstrings"))


@dataclass
class ArithmeticSource:
    """Generated multi-digit arithmetic with worked steps (see data_recipes.arithmetic)."""

    kind: str = "arithmetic"
    num_docs: int = 10_000
    seed: int = 0
    max_digits: int = 4
    """Operands have 1..max_digits digits."""
    quality: str = "general"
    max_docs: Optional[int] = None
    ops: str = added("+-*")
    """The operators problems draw from (e.g. "+-": addition and subtraction only)."""

    def __post_init__(self):
        if self.max_digits < 1:
            raise ValueError(f"max_digits: must be >= 1, got {self.max_digits}")
        check_ops(self.ops)


@dataclass
class RecallSource:
    """Generated key-value recall documents (see data_recipes.recall): retrieval that needs
    attention, e.g. in the pretraining mix of a base that postnas turns into a hybrid."""

    kind: str = "recall"
    num_docs: int = 10_000
    seed: int = 0
    pairs: int = 6
    """Key=value pairs listed per document (1 to 26: the keys are distinct letters)."""
    queries: int = 1
    """Keys asked per document, each followed by its value (drawn at random, repeats allowed)."""
    quality: str = "general"
    max_docs: Optional[int] = None

    def __post_init__(self):
        check_pairs(self.pairs)
        if self.queries < 1:
            raise ValueError(f"queries: must be >= 1, got {self.queries}")


SOURCE_KINDS: dict[str, type] = {
    "text": TextSource,
    "jsonl": JsonlSource,
    "parquet": ParquetSource,
    "hf": HFSource,
    "stdlib": StdlibSource,
    "arithmetic": ArithmeticSource,
    "recall": RecallSource,
}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


def build_source(source: dict[str, Any]):
    """The resolved source dict -> its config dataclass (unknown keys and bad values raise)."""
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"kind: unknown source kind {kind!r}; one of {', '.join(SOURCE_KINDS)}")
    cls = SOURCE_KINDS[kind]
    unknown = set(source) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown option(s) for a {kind} source: {', '.join(sorted(unknown))}")
    cfg = cls(**source)
    for f in fields(cls):
        if getattr(cfg, f.name) == MISSING:
            raise ValueError(f"{f.name}: required for a {kind} source")
    if "paths" in source and not isinstance(cfg.paths, (list, tuple)):
        raise ValueError(f"paths: must be a list of files or directories, got {cfg.paths!r}")
    return cfg


def missing_paths(source: dict[str, Any]) -> list[str]:
    """The entries of `paths` (in config order) that do not exist on this machine."""
    paths = source.get("paths")
    if not isinstance(paths, (list, tuple)):
        return []
    return [p for p in paths if not Path(p).expanduser().exists()]


def iter_documents(source: dict[str, Any]) -> Iterator[str]:
    """Stream the documents of a resolved source dict; empty documents are skipped."""
    cfg = build_source(source)
    docs = (_as_text(d) for d in _READERS[cfg.kind](cfg))
    docs = (d for d in docs if isinstance(d, str) and d.strip())
    return itertools.islice(docs, cfg.max_docs) if cfg.max_docs is not None else docs


def _as_text(doc: Any) -> Any:
    """A conversation field (a list of turns, e.g. OpenThoughts' `conversations`: [{from, value}]
    or OpenAI `messages`: [{role, content}]) is one document: its turns' text, one per paragraph."""
    if isinstance(doc, list) and doc and all(isinstance(t, dict) for t in doc):
        return "\n\n".join(str(t.get("value", t.get("content", ""))) for t in doc)
    return doc


# --------------------------------------------------------------------------------------------
# Readers


def _files(paths: list[str], pattern: str) -> Iterator[Path]:
    """Listed files as given; directories expanded recursively, in sorted order."""
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            yield from sorted(f for f in p.rglob(pattern) if f.is_file())
        elif p.exists():
            yield p
        else:
            raise FileNotFoundError(f"source path {p} does not exist")


def _read_text(cfg: TextSource) -> Iterator[str]:
    for path in _files(cfg.paths, cfg.pattern):
        if cfg.split == "file":
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        # paragraph mode streams line by line: a huge file never sits in memory whole
        block: list[str] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
        if block:
            yield "".join(block).rstrip("\n")


def _read_jsonl(cfg: JsonlSource) -> Iterator[str]:
    for path in _files(cfg.paths, cfg.pattern):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if cfg.field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {cfg.field!r} "
                                     f"(has {', '.join(record)})")
                yield record[cfg.field]


def _read_parquet(cfg: ParquetSource) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in _files(cfg.paths, cfg.pattern):
        pf = pq.ParquetFile(path)
        if cfg.column not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {cfg.column!r} (has {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=1024, columns=[cfg.column]):
            yield from batch.column(0).to_pylist()


def _read_hf(cfg: HFSource) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, streaming=True,
                               data_files=cfg.data_files)
    for example in ds:
        yield example[cfg.field]


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> Iterator[Path]:
    """The standard library's .py files in sorted order, without tests and installed packages."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def module_docstrings(code: str) -> list[str]:
    """Module, class and function docstrings of a module's source, in source order."""
    with warnings.catch_warnings():  # old escape sequences in some stdlib files warn
        warnings.simplefilter("ignore")
        tree = ast.parse(code)
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)),
                   key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n, clean=True))]


def _read_stdlib(cfg: StdlibSource) -> Iterator[str]:
    for path in stdlib_files():
        try:
            code = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if cfg.part == "code":
            yield code
            continue
        try:
            yield "\n\n".join(module_docstrings(code))
        except (SyntaxError, ValueError):
            continue


def _read_arithmetic(cfg: ArithmeticSource) -> Iterator[str]:
    return iter_arithmetic_documents(cfg.num_docs, cfg.seed, cfg.max_digits, cfg.ops)


def _read_recall(cfg: RecallSource) -> Iterator[str]:
    return recall_documents(cfg.seed, cfg.num_docs, cfg.pairs, cfg.queries)


_READERS = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "hf": _read_hf,
    "stdlib": _read_stdlib,
    "arithmetic": _read_arithmetic,
    "recall": _read_recall,
}
