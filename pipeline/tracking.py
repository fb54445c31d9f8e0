"""Driver-side MLflow: one parent run per pipeline (workdir), one nested run per stage output dir.

The parent run's id is kept in `<workdir>/mlflow_pipeline.json` and each stage run's id in
`<stage dir>/mlflow_run.json`, so a rerun after a crash continues the same runs instead of
scattering a stage's metrics over several. The job logs its step metrics into the stage run itself
(stages.engine.tracking); the driver logs the resolved config as params, the spec, manifest and log.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from launch.slurm import SCRIPT
from pipeline.graph import StageNode
from pipeline.recipe import Recipe
from pipeline.state import RUN_ID, read_run_id
from stages.contract import LOG, MANIFEST, SPEC, read_json, write_json_atomic
from stages.engine.tracking import flatten

PARENT = "mlflow_pipeline.json"
END_STATUS = {"done": "FINISHED", "failed": "FAILED", "upstream_failed": "FAILED",
              "preempted": "KILLED", "interrupted": "KILLED"}


def tracking_uri(recipe: Recipe) -> str:
    return (recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path(recipe.workdir) / 'mlflow.db'}")


class Tracker:
    def __init__(self, recipe: Recipe):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(recipe)
        self.workdir = Path(recipe.workdir)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = recipe.tracking.experiment or recipe.name
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=(self.workdir / "mlartifacts").as_uri())
        self.parent_id = self._parent_run(recipe)
        self._log_recipe(recipe)

    def _parent_run(self, recipe: Recipe) -> str:
        saved = self.workdir / PARENT
        known = read_json(saved) if saved.exists() else {}
        run_id = known.get(self.uri)
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=recipe.name,
                                     tags={"pipeline.workdir": str(self.workdir)})
        write_json_atomic(saved, {**known, self.uri: run.info.run_id})
        return run.info.run_id

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def stage_run(self, node: StageNode) -> str:
        """The stage's run (created on first use, reopened after an interruption)."""
        run_id = read_run_id(node.output_dir)
        if run_id and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=node.name, tags={
            "mlflow.parentRunId": self.parent_id, "stage.kind": node.kind, "stage.hash": node.hash,
            "stage.output_dir": str(node.output_dir)})
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
        for name in (SPEC, SCRIPT):  # SCRIPT: the sbatch script of a Slurm stage
            if (node.output_dir / name).exists():
                self.client.log_artifact(run_id, str(node.output_dir / name))

    def stage_ended(self, run_id: str, node: StageNode, status: str) -> None:
        for name in (MANIFEST, LOG):
            if (node.output_dir / name).exists():
                self.client.log_artifact(run_id, str(node.output_dir / name))
        self.client.set_terminated(run_id, END_STATUS.get(status, "FAILED"))

    def _log_recipe(self, recipe: Recipe) -> None:
        """The recipe as resolved (defaults, overrides, absolute paths) on the parent run."""
        from omegaconf import OmegaConf

        path = self.workdir / "recipe.resolved.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.structured(recipe)))
        self.client.log_artifact(self.parent_id, str(path))

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")
