"""The `prepare` stage: tokenize each source into a Megatron .bin/.idx shard, in parallel on Ray.

    python -m stages.prepare --spec <output_dir>/spec.json

Output: <output_dir>/shards/<source>.bin/.idx, one sequence per document, each ending in EOD.
Resumable per source: once a shard is renamed into place, a done-record
`shards/<source>.done.json` (counts, sizes, checksums) is written; a rerun skips every source
whose record still matches its files and starts the others from scratch. A preemption signal
stops the current source at the next batch (its partial shard is discarded).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from data_recipes.sources import iter_documents
from data_recipes.indexed_shards import tokenize_source_to_indexed
from stages.engine import job
from stages.configs.data import PrepareConfig
from data_recipes.config_fields import from_dict
from stages.contract import MANIFEST, StageSpec, read_json, sha256_file, write_json_atomic
from stages.engine.tracking import MetricLogger

PROGRESS_EVERY_S = 5.0


def _completed(prefix: Path, tokenizer_sha: str) -> dict | None:
    """The done-record of a finished shard, or None if the shard must be (re)built."""
    record_path = Path(f"{prefix}.done.json")
    if not record_path.exists():
        return None
    record = read_json(record_path)
    for ext in ("bin", "idx"):
        f = Path(f"{prefix}.{ext}")
        if not f.exists() or f.stat().st_size != record[f"{ext}_bytes"]:
            return None
    return record if record.get("tokenizer_sha256") == tokenizer_sha else None


class _Progress:
    """Prints docs/tokens/tokens-per-second at most every PROGRESS_EVERY_S; stops on preemption."""

    def __init__(self, name: str):
        self.name, self.start, self.last = name, time.perf_counter(), time.perf_counter()

    def __call__(self, docs: int, tokens: int) -> None:
        if job.preempt_requested():
            raise job.Preempted(f"stopped while tokenizing {self.name}")
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"{self.name}: {docs} docs, {tokens} tokens, "
                  f"{tokens / (now - self.start):,.0f} tokens/s", flush=True)


def prepare_source(name: str, source: dict, model_file: str, tokenizer_sha: str,
                   prefix: Path, docs_per_task: int) -> dict:
    """Tokenize one source into <prefix>.bin/.idx and write its done-record; returns the record."""
    Path(f"{prefix}.done.json").unlink(missing_ok=True)  # a stale record must not outlive its shard
    start = time.perf_counter()
    counts = tokenize_source_to_indexed(iter_documents(source), model_file, prefix,
                                        docs_per_task, progress=_Progress(name))
    seconds = time.perf_counter() - start
    if counts["documents"] == 0:  # an empty shard would only fail later, in pretraining's mmap
        raise ValueError(f"sources.{name}: no documents (an empty file, or `field`/`column` names "
                         f"no text field of its records)")
    record = {
        "prefix": str(prefix.resolve()), **counts,
        "bin_sha256": sha256_file(f"{prefix}.bin"), "idx_sha256": sha256_file(f"{prefix}.idx"),
        "bin_bytes": os.path.getsize(f"{prefix}.bin"), "idx_bytes": os.path.getsize(f"{prefix}.idx"),
        "quality": source.get("quality", "general"), "tokenizer_sha256": tokenizer_sha,
        "seconds": seconds, "tokens_per_s": counts["tokens"] / max(seconds, 1e-9),
    }
    write_json_atomic(f"{prefix}.done.json", record)
    return record


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(PrepareConfig, spec.config)
    tok = read_json(Path(spec.inputs["tokenizer"]) / MANIFEST)
    missing = [s for s in cfg.sources if s not in spec.sources]
    if missing:
        raise ValueError(f"sources: {', '.join(missing)} not among the spec's sources")
    shards_dir = spec.out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(spec)

    shards = {}
    for i, name in enumerate(cfg.sources):
        prefix = shards_dir / name
        record = _completed(prefix, tok["sha256"])
        if record is not None:
            print(f"{name}: done earlier ({record['documents']} docs, "
                  f"{record['tokens']} tokens), skipping", flush=True)
        else:
            print(f"{name}: tokenizing", flush=True)
            record = prepare_source(name, spec.sources[name], tok["model_file"], tok["sha256"],
                                    prefix, cfg.docs_per_task)
            print(f"{name}: {record['documents']} docs, {record['tokens']} tokens, "
                  f"{record['tokens_per_s']:,.0f} tokens/s", flush=True)
            logger.log(i, {"documents": record["documents"], "tokens": record["tokens"],
                           "tokens_per_s": record["tokens_per_s"]})
        shards[name] = {"prefix": str(prefix.resolve()),  # not the record's: the dir may have moved
                        **{k: record[k] for k in ("documents", "tokens", "bin_sha256",
                                                  "idx_sha256", "quality")}}
    logger.close()
    return {"tokenizer": tok["model_file"], "vocab_size": tok["vocab_size"],
            "eod_id": tok["eod_id"], "shards": shards}


if __name__ == "__main__":
    job.main(run)
