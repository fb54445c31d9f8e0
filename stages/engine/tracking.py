"""Job-side MLflow logging into the run the driver created for this stage.

Every metric is appended to `<output_dir>/metrics.jsonl` first (the local copy survives anything),
then sent to MLflow in batches (`log_batch` is ~50x cheaper per metric than `log_metric`). If the
tracking store is unreachable the batch stays queued and is retried at the next flush; a stage never
fails because of tracking, it reports what could not be sent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from stages.contract import StageSpec

FLUSH_EVERY_S = 5.0
RETRY_AFTER_S = 60.0  # after a failed send, train on for this long before trying again


class MetricLogger:
    def __init__(self, spec: StageSpec, rank: int = 0):
        self.enabled = rank == 0
        self.tracked = bool(spec.run_id)  # no run id (a job run by hand, tests): local file only
        self.run_id = spec.run_id
        self.uri = spec.tracking_uri
        self.local = Path(spec.output_dir) / "metrics.jsonl"
        self._queue: list[Any] = []
        self._last_flush = time.monotonic()
        self._client = None
        self.unsent_warning_shown = False

    @property
    def client(self):
        if self._client is None and self.tracked:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            # MLflow's HTTP defaults retry for minutes; a dead server must not stall training.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        with open(self.local, "a") as f:
            f.write(json.dumps({"step": step, "time": now, **metrics}) + "\n")
        if self.tracked:  # mlflow is imported only when there is a run to log into (~2.5 s)
            from mlflow.entities import Metric

            self._queue += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> bool:
        """Send queued metrics; True when nothing is left unsent."""
        self._last_flush = time.monotonic()
        if not self.enabled or not self._queue or not self.client:
            return not self._queue
        try:
            while self._queue:  # MLflow takes at most 1000 metrics per request
                self.client.log_batch(self.run_id, metrics=self._queue[:1000])
                del self._queue[:1000]
            return True
        except Exception as e:  # tracking must never kill training
            self._last_flush = time.monotonic() + RETRY_AFTER_S - FLUSH_EVERY_S
            if not self.unsent_warning_shown:
                print(f"[tracking] could not reach {self.uri}: {e}; metrics kept in {self.local} "
                      "and retried", file=sys.stderr, flush=True)
                self.unsent_warning_shown = True
            return False

    def artifact(self, path: str | os.PathLike, subdir: str | None = None) -> None:
        if self.enabled and self.client:
            self._guard(lambda: self.client.log_artifact(self.run_id, str(path), subdir))

    def table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table artifact (rendered as a table in the run's Artifacts view)."""
        if self.enabled and self.client and rows:
            columns = {k: [json.dumps(r[k]) if isinstance(r[k], (list, dict)) else r[k]
                           for r in rows] for k in rows[0]}
            self._guard(lambda: self.client.log_table(self.run_id, columns, artifact_file))

    def close(self) -> None:
        if self.enabled and not self.flush():
            print(f"[tracking] {len(self._queue)} metrics were not sent to MLflow; "
                  f"they are in {self.local}", file=sys.stderr, flush=True)

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:
            print(f"[tracking] {e}", file=sys.stderr, flush=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lr": {"max": 1}} -> {"lr.max": 1}; lists are indexed the way recipe overrides are."""
    out: dict[str, Any] = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
