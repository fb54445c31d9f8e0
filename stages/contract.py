"""The contract between the driver and a stage job: the spec file, the output dir, exit codes.

Nothing else crosses the process boundary. Torch-free so the driver and launchers can import it.

A job is started as `python -m stages.<kind> --spec <output_dir>/spec.json` (under torchrun/srun).
It resumes from whatever it finds in its output dir, writes `manifest.json` last (atomically) on
success, and before exiting writes `exit.json` saying how it ended, because torchrun turns every
non-zero worker exit into its own exit code 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "stopped cleanly after a checkpoint, start me again"

MANIFEST = "manifest.json"
SPEC = "spec.json"
EXIT_STATUS = "exit.json"
LOG = "job.log"
METRICS = "metrics.jsonl"
"""Every metric the job logs, one JSON line per log call (step, time, name: value, ...)."""
METRICS_SENT = "metrics.sent"
"""How many lines of metrics.jsonl are in MLflow; the rest is sent by `pipeline sync`."""
TRACKING_PENDING = "tracking_pending.jsonl"
"""Artifacts and tables the job could not send to MLflow (replayed by `pipeline sync`)."""
JOB_LOCK = "job.lock"
"""flock-ed by the job's rank-0 worker for its whole life: one job per stage dir."""
WORKERS = "workers"
"""One `<rank>.pid` file per worker process of the latest job (the launcher watches them all)."""


@dataclass
class StageSpec:
    name: str
    kind: str
    config: dict[str, Any]
    """The stage's resolved config (its kind's dataclass as a dict)."""
    output_dir: str
    inputs: dict[str, str] = field(default_factory=dict)
    """Reference field name -> output dir of the upstream stage it names."""
    model: dict[str, Any] = field(default_factory=dict)
    """The resolved model config (recipe model + stage overrides); empty for kinds without one."""
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The recipe sources this stage reads, resolved (kind + options)."""
    tracking_uri: str = ""
    run_id: str = ""
    """The MLflow run this stage logs into (created by the driver)."""
    hash: str = ""

    @property
    def out(self) -> Path:
        return Path(self.output_dir)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file in the same dir, fsync, rename: readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_jsonl_atomic(path: str | os.PathLike, rows: list[Any]) -> None:
    """One JSON object per line, all or nothing."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_spec(spec: StageSpec) -> Path:
    path = spec.out / SPEC
    write_json_atomic(path, spec.__dict__)
    return path


def load_spec(path: str | os.PathLike) -> StageSpec:
    return StageSpec(**read_json(path))


def write_manifest(spec: StageSpec, produced: dict[str, Any]) -> None:
    """Mark the stage complete. Must be the job's last write."""
    write_json_atomic(spec.out / MANIFEST, {"stage": spec.name, "kind": spec.kind,
                                            "hash": spec.hash, **produced})


def write_exit_status(spec: StageSpec, status: str, **info: Any) -> None:
    """status: done | preempted | failed. Read by the launcher to map the job's end.

    Also records this process's peak RSS (rank 0's), which the memory bench reads."""
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    write_json_atomic(spec.out / EXIT_STATUS, {"status": status, "peak_rss_mb": round(peak_mb, 1),
                                               **info})


def parse_spec_arg(argv: list[str] | None = None) -> StageSpec:
    parser = argparse.ArgumentParser(description="Run one pipeline stage job.")
    parser.add_argument("--spec", required=True, help="path to the stage's spec.json")
    return load_spec(parser.parse_args(argv).spec)
