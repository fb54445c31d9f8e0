"""The `sft_tokenize` stage: conversation datasets -> the SFT store, in parallel on Ray.

    python -m stages.sft_tokenize --spec <output_dir>/spec.json

Each dataset (data_recipes.conversations) is read as it streams, its records turned into our chat
messages and encoded with the chat template (loss mask on the assistant turns) by Ray tasks, and
written to `store/<dataset>-NNNNN` shards (data_recipes.sft_store) of `records_per_shard` records.
Malformed records are skipped and listed in `store/<dataset>.errors.txt` (file:line: what is
wrong); past a dataset's `max_errors` the stage fails naming it. Resumable per shard: a shard with
a matching done-record is skipped; a preemption stops inside the current shard, which is
discarded. Before any work every dataset's first record is read: a dataset with none of its
format's fields is a one-line error and nothing is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from data_recipes.config_fields import from_dict
from data_recipes.conversations import first_record_problem
from data_recipes.sft_store import tokenize_dataset
from stages.configs.data import SFTTokenizeConfig
from stages.contract import MANIFEST, StageSpec, read_json, sha256_file, write_text_atomic
from stages.engine import job
from stages.engine.tracking import MetricLogger

PROGRESS_EVERY_S = 5.0


class _Progress:
    """Prints records, tokens and tokens/s at most every PROGRESS_EVERY_S; stops on preemption."""

    def __init__(self, name: str):
        self.name, self.start, self.last = name, time.perf_counter(), time.perf_counter()

    def __call__(self, records: int, tokens: int) -> None:
        if job.preempt_requested():
            raise job.Preempted(f"stopped while tokenizing {self.name}")
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"{self.name}: {records} records, {tokens} tokens, "
                  f"{tokens / (now - self.start):,.0f} tokens/s (this shard)", flush=True)


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(SFTTokenizeConfig, spec.config)
    if not cfg.datasets:
        raise ValueError("datasets: name at least one conversation dataset (name, source, format)")
    tok = read_json(Path(spec.inputs["tokenizer"]) / MANIFEST)
    for i, d in enumerate(cfg.datasets):  # all of them before any work (hub datasets included)
        problem = first_record_problem(d)
        if problem:
            raise ValueError(f"datasets[{i}].format: {problem}")
    tok_sha = sha256_file(tok["model_file"])
    store = spec.out / "store"
    store.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(spec)
    datasets = []
    for i, d in enumerate(cfg.datasets):
        start = time.perf_counter()
        entry = tokenize_dataset(d, tok, tok_sha, store, cfg.records_per_shard,
                                 cfg.records_per_task, cfg.thinking, _Progress(d.name))
        seconds = time.perf_counter() - start
        errors = entry.pop("errors")
        write_text_atomic(store / f"{d.name}.errors.txt", "".join(e + "\n" for e in errors))
        for line in errors[:10]:
            print(f"{d.name}: skipped {line}", flush=True)
        share = entry["malformed"] / max(entry["records"], 1)
        print(f"{d.name}: {entry['conversations']} conversations, {entry['tokens']} tokens "
              f"({entry['trained_tokens']} trained), {entry['malformed']} malformed records "
              f"skipped, {seconds:.1f}s", flush=True)
        if share > d.max_errors:
            raise ValueError(
                f"datasets[{i}].max_errors: {d.name}: {entry['malformed']} of {entry['records']} "
                f"records are malformed ({share:.2%}), over the budget of {d.max_errors:.2%}; "
                f"first: {errors[0]} (all in {store / (d.name + '.errors.txt')})")
        logger.log(i, {"conversations": entry["conversations"], "tokens": entry["tokens"],
                       "malformed": entry["malformed"],
                       "tokens_per_s": entry["tokens"] / max(seconds, 1e-9)})
        # relative to the stage dir, which may move (sft resolves them against its input)
        entry["shards"] = [str(Path(p).relative_to(spec.out)) for p in entry["shards"]]
        datasets.append(entry)
    logger.close()
    return {"sft_store": {"tokenizer_sha256": tok_sha, "thinking": cfg.thinking,
                          "datasets": datasets},
            "conversations": sum(d["conversations"] for d in datasets),
            "tokens": sum(d["tokens"] for d in datasets)}


if __name__ == "__main__":
    job.main(run)
