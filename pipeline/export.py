"""`pipeline export RECIPE STAGE`: a finished stage's latest checkpoint as a Hugging Face dir,
without adding an `export` stage to the recipe. Runs the export job (stages.hf_export) in a
subprocess on this machine, TP=PP=1, so the driver stays torch-free.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from pipeline.recipe import RecipeError
from stages.configs.hf import ExportConfig
from stages.contract import MANIFEST, StageSpec, read_json, save_spec


def export_stage(graph: dict, stage: str, out: str | None = None, dtype: str = "bfloat16") -> int:
    """Export `stage` into `out` (default `<workdir>/exports/<stage>-<hash8>`); the job's exit code."""
    if stage not in graph:
        raise RecipeError([("", f"{stage!r} is not a stage of this recipe ({', '.join(graph)})")])
    node = graph[stage]
    manifest_path = Path(node.output_dir) / MANIFEST
    if not manifest_path.is_file():
        raise RecipeError([(f"stages.{stage}", f"has not finished ({node.output_dir} has no "
                                               f"{MANIFEST}): run it first")])
    manifest = read_json(manifest_path)
    tokenizer = stage if node.kind == "import" else node.refs.get("tokenizer")
    if tokenizer is None:
        raise RecipeError([(f"stages.{stage}", "names no tokenizer stage to export with it")])
    model = node.model or manifest.get("model")  # an import stage states its own model
    if not model:
        raise RecipeError([(f"stages.{stage}", f"a {node.kind} stage has no model to export")])
    out_dir = Path(out) if out else (Path(node.output_dir).parent / "exports"
                                     / Path(node.output_dir).name)
    spec = StageSpec(name=f"{stage}-export", kind="export",
                     config=dataclasses.asdict(ExportConfig(init=stage, tokenizer=tokenizer,
                                                            dtype=dtype)),
                     output_dir=str(out_dir.resolve()), model=model,
                     inputs={"init": str(node.output_dir),
                             "tokenizer": str(graph[tokenizer].output_dir)})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_spec(spec)
    code = subprocess.call([sys.executable, "-m", "stages.hf_export", "--spec", str(path)])
    if code == 0:
        print(f"exported {stage} to {out_dir.resolve() / 'hf'}", flush=True)
    return code
