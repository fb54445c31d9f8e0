"""Job-side metric logging: the local copy always, MLflow in batches, and an unreachable tracking
server neither fails nor stalls the job."""

import json
import time

from mlflow.tracking import MlflowClient

from stages.contract import StageSpec
from pipeline.tracking import flatten
from stages.engine.tracking import MetricLogger


def spec(tmp_path, uri="", run_id=""):
    return StageSpec(name="s", kind="noop", config={}, output_dir=str(tmp_path),
                     tracking_uri=uri, run_id=run_id)


def test_metrics_reach_mlflow_in_batches_and_the_local_file(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    log = MetricLogger(spec(tmp_path, uri, run_id))
    for step in range(1500):  # more than one request's worth
        log.log(step, {"loss": 1.0 / (step + 1), "lr": 0.1})
    log.close()
    assert len(client.get_metric_history(run_id, "loss")) == 1500
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1500 and json.loads(lines[-1])["step"] == 1499


def test_unreachable_server_keeps_metrics_locally_and_does_not_stall(tmp_path, capsys):
    log = MetricLogger(spec(tmp_path, "http://127.0.0.1:9", "0123456789abcdef"))  # nothing listens
    start = time.monotonic()
    for step in range(50):
        log.log(step, {"loss": 1.0})
    assert log.flush() is False
    log.close()
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert "could not reach http://127.0.0.1:9" in err and "were not sent to MLflow" in err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 50


def test_no_run_id_means_local_file_only(tmp_path, capsys):
    log = MetricLogger(spec(tmp_path))
    log.log(0, {"loss": 2.0})
    log.close()
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0


def test_flatten_uses_override_style_keys():
    assert flatten({"lr": {"max": 1}, "phases": [{"tokens": 5}], "empty": []}) == {
        "lr.max": 1, "phases.0.tokens": 5, "empty": []}
