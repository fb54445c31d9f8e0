"""Prompt records from files and datasets: jsonl, parquet or a Hugging Face dataset, whole rows.

data_recipes.sources streams one text field per document (pretraining); a prompt set needs whole
rows (prompt or messages, answer, tests, system prompt), so these readers yield each row as a
dict, with where it came from (`file:line`, `file:row`, `dataset[split]:row`) for error messages.
Directories are expanded like sources' (sources._files: sorted, recursive).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from data_recipes.sources import _files

FILE_KINDS = ("jsonl", "parquet", "hf")
_PATTERNS = {"jsonl": "*.jsonl*", "parquet": "*.parquet"}


def iter_rows(cfg) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a file prompt set (a PromptsConfig of kind jsonl, parquet or hf)."""
    if cfg.kind == "hf":
        yield from _hf_rows(cfg)
        return
    for path in _files([cfg.path], _PATTERNS[cfg.kind]):
        yield from (jsonl_rows if cfg.kind == "jsonl" else _parquet_rows)(path)


def first_row(cfg) -> tuple[str, dict[str, Any]] | None:
    """The first row of a local file set (to check the field map before a job starts), None if
    the set is empty or is a hub dataset (which the check does not download)."""
    if cfg.kind == "hf":
        return None
    if cfg.kind == "parquet":  # the schema is enough: every row has every column
        import pyarrow.parquet as pq

        for path in _files([cfg.path], _PATTERNS["parquet"]):
            return f"{path}", {name: None for name in pq.ParquetFile(path).schema_arrow.names}
        return None
    return next(iter_rows(cfg), None)


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) of each non-blank line of a jsonl file (.gz too); ValueError naming
    the line that is not a JSON object."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            yield f"{path}:{lineno}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row


def _hf_rows(cfg) -> Iterator[tuple[str, dict]]:
    import datasets

    ds = datasets.load_dataset(cfg.name, cfg.hf_config, split=cfg.hf_split, streaming=True,
                               data_files=cfg.data_files)
    for n, row in enumerate(ds, 1):
        yield f"{cfg.name}[{cfg.hf_split}]:row {n}", row
