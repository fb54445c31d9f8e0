"""Job-side MLflow logging into the run the driver created for this stage.

Every metric is appended to `<output_dir>/metrics.jsonl` first (the local copy survives anything),
then sent to MLflow in batches (`log_batch` is ~50x cheaper per metric than `log_metric`), whole
lines at a time; `metrics.sent` counts the lines that reached MLflow. If the tracking server is
unreachable the lines stay queued and are retried at the next flush; what is still unsent when
the job ends (and artifacts it could not send, listed in `tracking_pending.jsonl`) is sent later
by the driver (`pipeline sync`, or the next `pipeline run`). A stage never fails because of
tracking; it reports what could not be sent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from stages.contract import (METRICS, METRICS_SENT, TRACKING_PENDING, StageSpec,
                             write_text_atomic)

FLUSH_EVERY_S = 5.0
RETRY_AFTER_S = 60.0  # after a failed send, train on for this long before trying again
BATCH = 1000  # MLflow takes at most 1000 metrics per request


class MetricLogger:
    def __init__(self, spec: StageSpec, rank: int = 0, system_metrics: bool = True):
        self.enabled = rank == 0
        self.tracked = bool(spec.run_id)  # no run id (by hand, tests, server down): local only
        self.run_id = spec.run_id
        self.uri = spec.tracking_uri
        self.out = Path(spec.output_dir)
        self.local = self.out / METRICS
        self._client = None
        self._last_flush = time.monotonic()
        self.unsent_warning_shown = False
        # lines not yet in MLflow, in file order: an earlier attempt's tail first (resume)
        self._sent, self._queue = self._unsent_tail() if self.enabled and self.tracked else (0, [])
        self._system = start_system_metrics(spec) if system_metrics and self.tracked else None

    def _unsent_tail(self) -> tuple[int, list[dict]]:
        lines = read_metric_lines(self.local)
        sent = read_sent(self.out)
        return sent, lines[sent:]

    @property
    def client(self):
        if self._client is None and self.tracked:
            _short_http()
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = {"step": step, "time": int(time.time() * 1000), **metrics}
        with open(self.local, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.tracked:
            self._queue.append(line)
        if time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> bool:
        """Send queued lines; True when nothing is left unsent."""
        self._last_flush = time.monotonic()
        if not self.enabled or not self._queue or not self.client:
            return not self._queue
        try:
            self._sent = send_metric_lines(self.client, self.run_id, self._queue, self.out,
                                           self._sent)
            return True
        except Exception as e:  # tracking must never kill training
            self._last_flush = time.monotonic() + RETRY_AFTER_S - FLUSH_EVERY_S
            self._sent = read_sent(self.out)
            if not self.unsent_warning_shown:
                print(f"[tracking] could not reach {self.uri}: {e}; metrics kept in {self.local} "
                      "and retried", file=sys.stderr, flush=True)
                self.unsent_warning_shown = True
            return False

    def artifact(self, path: str | os.PathLike, subdir: str | None = None) -> None:
        if not self.enabled:
            return
        if not self._send(lambda: self.client.log_artifact(self.run_id, str(path), subdir)):
            self._pending({"kind": "artifact", "path": str(path), "subdir": subdir})

    def table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table artifact (rendered as a table in the run's Artifacts view)."""
        if not self.enabled or not rows:
            return
        columns = table_columns(rows)
        if not self._send(lambda: self.client.log_table(self.run_id, columns, artifact_file)):
            kept = self.out / f"{artifact_file}.pending.json"
            write_text_atomic(kept, json.dumps(columns))
            self._pending({"kind": "table", "columns": str(kept), "artifact_file": artifact_file})

    def close(self) -> None:
        if self._system is not None:
            self._system.finish()
            self._system = None
        if self.enabled and not self.flush():
            print(f"[tracking] {len(self._queue)} metric lines were not sent to MLflow; "
                  f"they are in {self.local} and `pipeline sync` sends them",
                  file=sys.stderr, flush=True)

    def _send(self, fn) -> bool:
        if not self.tracked or not self.client:
            return False
        try:
            fn()
            return True
        except Exception as e:
            print(f"[tracking] {e}", file=sys.stderr, flush=True)
            return False

    def _pending(self, item: dict[str, Any]) -> None:
        with open(self.out / TRACKING_PENDING, "a") as f:
            f.write(json.dumps(item) + "\n")


def _short_http() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's HTTP defaults retry for minutes; a dead server must not stall training.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def start_system_metrics(spec: StageSpec, interval_s: float = 10.0):
    """MLflow's own system metrics into the stage's run (`system/...`: CPU, memory, disk, network;
    GPU utilisation and memory when pynvml is installed), sampled by each node's first process
    (`system/<host>/...` on a multi-node job). MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides
    the interval. Never fails the job: without a reachable server there are no system metrics."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    nodes = int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    _short_http()  # the monitor asks the server for the run at start and at every sample
    try:
        import socket

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(spec.run_id, sampling_interval=interval_s,
                                       resume_logging=True, tracking_uri=spec.tracking_uri,
                                       node_id=socket.gethostname() if nodes > 1 else None)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - tracking must never kill training
        print(f"[tracking] no system metrics: {e}", file=sys.stderr, flush=True)
        return None


def read_metric_lines(path: Path) -> list[dict]:
    """metrics.jsonl's complete lines (a line cut short by a kill is dropped)."""
    lines = []
    if path.exists():
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                pass
    return lines


def read_sent(out: Path) -> int:
    try:
        return int((out / METRICS_SENT).read_text())
    except (OSError, ValueError):
        return 0


def send_metric_lines(client, run_id: str, queue: list[dict], out: Path, sent: int) -> int:
    """Send `queue` (the lines after the first `sent` of metrics.jsonl) in batches of whole lines,
    popping each batch and advancing `metrics.sent` once MLflow has it. Returns the new count."""
    from mlflow.entities import Metric

    while queue:
        batch, n_lines = [], 0
        for line in queue:
            metrics = [Metric(k, float(v), line["time"], line["step"]) for k, v in line.items()
                       if k not in ("step", "time")]
            if batch and len(batch) + len(metrics) > BATCH:
                break
            batch += metrics
            n_lines += 1
        for i in range(0, len(batch), BATCH):  # one line may hold more than a request takes
            client.log_batch(run_id, metrics=batch[i:i + BATCH])
        del queue[:n_lines]
        sent += n_lines
        write_text_atomic(out / METRICS_SENT, str(sent))
    return sent


def table_columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [json.dumps(r[k]) if isinstance(r[k], (list, dict)) else r[k] for r in rows]
            for k in rows[0]}


def sync(out: Path, run_id: str, uri: str) -> bool:
    """Send what this stage's job kept back during an outage: its unsent metric lines, then the
    artifacts and tables in tracking_pending.jsonl. True when all of it reached MLflow."""
    logger = MetricLogger(StageSpec(name=out.name, kind="", config={}, output_dir=str(out),
                                    tracking_uri=uri, run_id=run_id), system_metrics=False)
    if not logger.flush():
        return False
    pending = out / TRACKING_PENDING
    items = [json.loads(line) for line in pending.read_text().splitlines()] if pending.exists() else []
    for item in items:
        if item["kind"] == "artifact":
            logger.client.log_artifact(run_id, item["path"], item["subdir"])
        else:
            columns = json.loads(Path(item["columns"]).read_text())
            logger.client.log_table(run_id, columns, item["artifact_file"])
    pending.unlink(missing_ok=True)
    return True


if __name__ == "__main__":  # python -m stages.engine.tracking STAGE_DIR RUN_ID TRACKING_URI
    sys.exit(0 if sync(Path(sys.argv[1]), sys.argv[2], sys.argv[3]) else 1)
