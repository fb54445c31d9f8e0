"""Driver-side MLflow: one parent run per pipeline (workdir), one nested run per stage output dir.

The parent run's id is kept in `<workdir>/mlflow_pipeline.json` and each stage run's id in
`<stage dir>/mlflow_run.json`, so a rerun after a crash continues the same runs instead of
scattering a stage's metrics over several. The job logs its step metrics into the stage run itself
(stages.engine.tracking); the driver logs the resolved config as params, the spec, manifest and log.

Outage-proof: a tracking server that cannot be reached never stops a run. The stages then run
with no run id (their jobs log to their own dirs only), and whatever the driver could not send is
marked by an `mlflow_unsynced` file in the stage dir (or the workdir, for the parent run).
`sync` sends it all once the server answers: run creation, params, the job's unsent metric lines
and artifacts (through the job-side `python -m stages.engine.tracking`), the driver's artifacts
and each run's end status. `pipeline run` syncs before it starts stages and after they end;
`pipeline sync RECIPE` does it by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launch.slurm import SCRIPT
from pipeline.graph import StageNode
from pipeline.recipe import Recipe
from pipeline.state import RUN_ID, read_run_id, stage_state
from stages.contract import (LOG, MANIFEST, METRICS, METRICS_SENT, SPEC, TRACKING_PENDING,
                             read_json, write_json_atomic)

PARENT = "mlflow_pipeline.json"
UNSYNCED = "mlflow_unsynced"
END_STATUS = {"done": "FINISHED", "failed": "FAILED", "upstream_failed": "FAILED",
              "preempted": "KILLED", "interrupted": "KILLED"}


def code_version() -> dict[str, str]:
    """MLflow's git tags for the pipeline's own code: the commit, and whether the checkout had
    uncommitted changes (then the commit alone does not say what ran). {} outside a checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty.strip())).lower()}


def tracking_uri(recipe: Recipe) -> str:
    return (recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path(recipe.workdir) / 'mlflow.db'}")


class Tracker:
    def __init__(self, recipe: Recipe):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # MLflow's HTTP defaults retry for minutes: a dead server would stall the driver.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.recipe = recipe
        self.uri = tracking_uri(recipe)
        self.workdir = Path(recipe.workdir)
        self.online = False
        self.parent_id = ""
        self._warned = False
        self.connect()

    # --- connection ----------------------------------------------------------------------------
    def connect(self) -> bool:
        """(Re)open the experiment and the parent run; False while the server cannot be reached."""
        if self.online:
            return True
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            name = self.recipe.tracking.experiment or self.recipe.name
            exp = self.client.get_experiment_by_name(name)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=(self.workdir / "mlartifacts").as_uri())
            self.parent_id = self._parent_run()
            self._log_recipe()
            self.online = True
        except Exception as e:
            self._went_offline(e, self.workdir)
        return self.online

    def _went_offline(self, error: Exception, unsynced_dir: Path) -> None:
        self.online = False
        unsynced_dir.mkdir(parents=True, exist_ok=True)
        (unsynced_dir / UNSYNCED).touch()
        if not self._warned:
            print(f"[tracking] MLflow at {self.uri} cannot be reached ({type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200] if str(error) else ''}); stages run and log "
                  f"to their own dirs; `pipeline sync` (or the next `pipeline run`) sends it all",
                  file=sys.stderr, flush=True)
            self._warned = True

    def _guard(self, node: StageNode, fn) -> Any:
        """fn() if the server answers; else mark the stage unsynced and return None."""
        if self.online:
            try:
                return fn()
            except Exception as e:
                self._went_offline(e, node.output_dir)
                return None
        node.output_dir.mkdir(parents=True, exist_ok=True)
        (node.output_dir / UNSYNCED).touch()
        return None

    # --- runs ----------------------------------------------------------------------------------
    def _parent_run(self) -> str:
        saved = self.workdir / PARENT
        known = read_json(saved) if saved.exists() else {}
        run_id = known.get(self.uri)
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.recipe.name,
                                     tags={"pipeline.workdir": str(self.workdir),
                                           **code_version()})
        write_json_atomic(saved, {**known, self.uri: run.info.run_id})
        return run.info.run_id

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def stage_run(self, node: StageNode) -> str:
        """The stage's run (created on first use, reopened after an interruption); while the
        server is down, the run id it had before or "" (its job then logs locally only)."""
        return self._guard(node, lambda: self._stage_run(node)) or read_run_id(node.output_dir)

    def _stage_run(self, node: StageNode) -> str:
        run_id = read_run_id(node.output_dir)
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            for key, value in code_version().items():  # the code this attempt runs
                self.client.set_tag(run_id, key, value)
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=node.name, tags={
            "mlflow.parentRunId": self.parent_id, "stage.kind": node.kind, "stage.hash": node.hash,
            "stage.output_dir": str(node.output_dir), **code_version()})
        run_id = run.info.run_id
        from mlflow.entities import Param

        params = flatten({"config": dataclasses.asdict(node.config), "model": node.model,
                          "sources": node.sources})
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's per-request param limit
            self.client.log_batch(run_id, params=items[i:i + 100])
        write_json_atomic(node.output_dir / RUN_ID, {"run_id": run_id, "tracking_uri": self.uri})
        return run_id

    def log_spec(self, run_id: str, node: StageNode) -> None:
        self._guard(node, lambda: self._log_files(run_id, node, (SPEC, SCRIPT)))

    def stage_ended(self, run_id: str, node: StageNode, status: str) -> None:
        def end() -> None:
            if not run_id:  # started while the server was down: sync creates its run
                raise ConnectionError("the stage has no MLflow run yet")
            self._log_files(run_id, node, (MANIFEST, LOG))
            self.client.set_terminated(run_id, END_STATUS.get(status, "FAILED"))
        self._guard(node, end)

    def _log_files(self, run_id: str, node: StageNode, names: tuple[str, ...]) -> None:
        for name in names:  # SCRIPT: the sbatch script of a Slurm stage
            if (node.output_dir / name).exists():
                self.client.log_artifact(run_id, str(node.output_dir / name))

    def _log_recipe(self) -> None:
        """The recipe as resolved (defaults, overrides, absolute paths) on the parent run."""
        path = self.workdir / "recipe.resolved.yaml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(OmegaConf.to_yaml(OmegaConf.structured(self.recipe)))
        self.client.log_artifact(self.parent_id, str(path))

    def log_ladder(self, rows: list[dict[str, Any]]) -> None:
        """The eval ladder (pipeline.ladder) on the parent run: ladder.json and ladder.png."""
        from pipeline.ladder import plot_ladder

        table = self.workdir / "ladder.json"
        table.write_text(json.dumps(rows, indent=1))
        files = [table, plot_ladder(rows, self.workdir / "ladder.png")]
        if self.online:
            try:
                for path in files:
                    self.client.log_artifact(self.parent_id, str(path))
            except Exception as e:
                self._went_offline(e, self.workdir)

    def finish(self, ok: bool) -> None:
        status = "FINISHED" if ok else "FAILED"
        if self.online:
            try:
                self.client.set_terminated(self.parent_id, status)
                (self.workdir / UNSYNCED).unlink(missing_ok=True)
                return
            except Exception as e:
                self._went_offline(e, self.workdir)
        (self.workdir / UNSYNCED).write_text(status)  # the parent run's end, for sync to set

    # --- catching up after an outage -------------------------------------------------------------
    def sync(self, graph: dict[str, StageNode]) -> bool:
        """Send what an outage kept from MLflow, for every stage of `graph` whose job is not
        running (a running job sends its own lines; e.g. a Slurm job a driver re-attaches to).
        False when the server still cannot be reached."""
        behind = [n for n in graph.values() if unsynced(n.output_dir)
                  and stage_state(n.output_dir).state != "running"]
        if not behind and not (self.workdir / UNSYNCED).exists():
            return True
        print(f"[tracking] sending MLflow what an outage kept back: {len(behind)} stage(s)",
              flush=True)
        if not self.connect():
            return False
        for node in behind:
            if not self._sync_stage(node):
                return False
            print(f"[tracking] {node.name}: sent to MLflow what an outage had kept back",
                  flush=True)
        ended = (self.workdir / UNSYNCED).read_text().strip() if (self.workdir / UNSYNCED).exists() else ""
        if ended:
            self.client.set_terminated(self.parent_id, ended)
        (self.workdir / UNSYNCED).unlink(missing_ok=True)
        return True

    def _sync_stage(self, node: StageNode) -> bool:
        run_id = self.stage_run(node)
        if not self.online:
            return False
        job_side = subprocess.run(  # the job's own logger sends its unsent lines and artifacts
            [sys.executable, "-m", "stages.engine.tracking", str(node.output_dir), run_id, self.uri],
            capture_output=True, text=True)
        if job_side.returncode != 0:
            self._went_offline(RuntimeError(job_side.stderr.strip()[-300:]), node.output_dir)
            return False
        state = stage_state(node.output_dir).state
        self._guard(node, lambda: self._log_files(run_id, node, (SPEC, SCRIPT, MANIFEST, LOG)))
        if state in END_STATUS:
            self._guard(node, lambda: self.client.set_terminated(run_id, END_STATUS[state]))
        if self.online:
            (node.output_dir / UNSYNCED).unlink(missing_ok=True)
        return self.online


def needs_sync(graph: dict[str, StageNode], workdir: Path) -> bool:
    return (workdir / UNSYNCED).exists() or any(unsynced(n.output_dir) for n in graph.values())


def unsynced(output_dir: Path) -> bool:
    """Whether a stage dir holds tracking data MLflow does not have yet."""
    if (output_dir / UNSYNCED).exists() or (output_dir / TRACKING_PENDING).exists():
        return True
    try:  # a job that logged to a run but could not send every line (no file: nothing sent)
        sent = int((output_dir / METRICS_SENT).read_text())
        lines = (output_dir / METRICS).read_text().splitlines()
    except (OSError, ValueError):
        return False
    return sum(_is_json(line) for line in lines) > sent  # a line cut by a kill never counts


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


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
