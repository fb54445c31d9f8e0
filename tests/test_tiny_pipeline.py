"""The tiny recipe end to end as a user runs it (`pipeline run recipes/tiny.yaml`), budgets cut.

The suite runs the file itself, every stage and edge of it, with the command-line overrides in
SHORTER: 60 pretraining steps instead of 160, and SFT data, SFT, distillation, RL and the evals cut
to a fraction of their prompts and steps. That checks the plumbing, not learning: this short a
base learns no answer format (answered 0.00 after SFT), so distillation keeps tied pairs. At its own budgets the
recipe takes ~19 min on 2 cores, two thirds of the suite's 30-minute budget;
`bench/tiny_seeds.py` runs and times it as written.

One module-scoped run is shared by the checks below; then the same workdir is used to show that a
rerun skips everything and that an override reruns only the stage it changes.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO

TINY = REPO / "recipes" / "tiny.yaml"
STAGES = ("tokenizer", "prepare", "pretrain", "eval_base", "sft_data", "sft", "eval_sft",
          "teacher_pretrain", "teacher_sft", "eval_teacher", "distill", "eval_distill",
          "rl.stem", "rl.code", "rl.align", "eval_rl_stem", "eval_code_before", "eval_code_after",
          "eval_rl")
EVALS = [n for n in STAGES if n.startswith("eval_")]
pytestmark = pytest.mark.slow

PRETRAINS = ("pretrain", "teacher_pretrain")
DISTILL_PROMPTS = 32
SHORTER = [  # every stage, phase and step kind still runs, at a fraction of the compute
    *(f"stages.{s}.phases.{i}.tokens={t}" for s in PRETRAINS
      for i, t in enumerate((10240, 10240, 10240, 10240, 20480))),  # 60 steps, not 160
    *(f"stages.{s}.lr.decay_tokens=20480" for s in PRETRAINS),
    # SFT data from 48 + 32 prompts, not 160 + 96
    "stages.sft_data.prompts.num=48", "stages.sft_data.more_prompts.0.num=32",
    "stages.sft.epochs=3", "stages.teacher_sft.epochs=3",
    # this short a base learns no answer format, so teacher and student are both wrong: keep
    # pairs at margin 0 (ties) so that DPD still trains
    f"stages.distill.prompts.num={DISTILL_PROMPTS}", "stages.distill.epochs=1",
    "stages.distill.filter.min_margin=0",
    *(f"stages.rl.substages.{i}.grpo.steps=2" for i in range(3)),
    *(f"stages.rl.substages.{i}.filter.samples=4" for i in range(3)),
    *(f"stages.{e}.{key}" for e in EVALS for key in ("samples=2", "k=[1,2]", "prompts.num=16")),
]


def pipeline(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, **kw)


def stage_dirs(workdir: Path) -> dict[str, list[Path]]:
    dirs: dict[str, list[Path]] = {}
    for p in sorted(workdir.iterdir()):
        if p.is_dir() and "-" in p.name:
            dirs.setdefault(p.name.rsplit("-", 1)[0], []).append(p)
    return dirs


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny") / "wd"
    start = time.monotonic()
    result = pipeline("run", str(TINY), f"workdir={workdir}", *SHORTER)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result, seconds


def test_all_stages_complete_with_progress_output(tiny_run):
    workdir, result, seconds = tiny_run
    print(f"tiny pipeline: {seconds:.0f} s")
    dirs = stage_dirs(workdir)
    assert set(dirs) == set(STAGES)
    shards = manifest(dirs["prepare"][0])["shards"]
    assert set(shards) == {"code", "prose", "arithmetic"}
    assert {s["quality"] for s in shards.values()} == {"general", "high"}
    for s in shards.values():
        assert Path(s["prefix"] + ".bin").exists() and Path(s["prefix"] + ".idx").exists()
        assert s["documents"] > 0 and s["tokens"] > s["documents"]
    pre = manifest(dirs["pretrain"][0])
    assert len(pre["eval_losses"]) == 5  # held-out loss at the end of every phase
    assert "[pretrain]" in result.stdout and f"all {len(STAGES)} stages finished" in result.stdout
    data = manifest(dirs["sft_data"][0])
    assert data["drafted"] == data["prompts"] and 0 < data["accepted"] <= data["prompts"]
    assert data["accepted"] + data["rejected"] == data["prompts"]
    assert sum(r["accepted"] for r in data["rounds"]) == data["accepted"]
    sft = manifest(dirs["sft"][0])
    held = sft["heldout_loss"]  # before SFT, then after each epoch
    assert held[str(len(held) - 1)] < held["0"]
    assert sft["model"]["rotary_base"] == 40000  # the architecture pretraining ended with
    for name in EVALS:
        ev = manifest(dirs[name][0])
        assert ev["prompts"] > 0 and "pass_at_2" in ev
        assert 0 <= ev["exact_match"] <= 1 and 0 <= ev["answered"] <= 1
    print("exact match: " + ", ".join(f"{n[5:]} {manifest(dirs[n][0])['exact_match']:.3f}"
                                      for n in EVALS))
    distill = manifest(dirs["distill"][0])
    assert distill["model"]["num_layers"] == 2 and distill["teacher_model"]["num_layers"] == 4
    assert distill["pairs_sampled"] == DISTILL_PROMPTS
    assert 0 < distill["pairs_kept"] <= DISTILL_PROMPTS
    assert set(distill["heldout"]) == {"0", "1"}  # before, then after each epoch
    rl = [manifest(dirs[n][0]) for n in ("rl.stem", "rl.code", "rl.align")]
    assert [m["substage"] for m in rl] == ["stem", "code", "align"]
    assert all(m["final_step"] == 2 and m["filter_prompts"] > 0 for m in rl)
    print("RL filter kept: " + ", ".join(f"{m['substage']} {m['filter_kept']}/{m['filter_prompts']}"
                                          for m in rl))
    assert f"sqlite:///{workdir}/mlflow.db" in result.stdout
    ladder = result.stdout.split("eval ladder (DAG order):\n", 1)[1].splitlines()
    assert [line.split()[0] for line in ladder[1:1 + len(EVALS)]] == EVALS


def test_mlflow_has_parent_and_nested_runs_with_params_metrics_artifacts(tiny_run):
    workdir = tiny_run[0]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parent, = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    stages = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(stages) == set(STAGES)
    assert {r.data.tags["mlflow.parentRunId"] for r in stages.values()} == {parent.info.run_id}
    assert {r.info.status for r in stages.values()} == {"FINISHED"}
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"recipe.resolved.yaml", "ladder.json", "ladder.png"} <= parent_files
    ladder = json.loads(Path(client.download_artifacts(parent.info.run_id, "ladder.json"))
                        .read_text())
    assert [r["stage"] for r in ladder] == EVALS  # DAG order
    for row in ladder:
        assert row["scores"]["exact_match"] == manifest(
            stage_dirs(workdir)[row["stage"]][0])["exact_match"]

    pre = stages["pretrain"]
    assert pre.data.params["config.lr.max"] == "0.003"
    assert pre.data.params["config.phases.4.seq_length"] == "256"
    assert pre.data.params["model.hidden_size"] == "256"
    run_id = pre.info.run_id
    for metric in ("loss", "lr", "tokens", "tokens_per_s", "mixture/arithmetic", "mixture/code",
                   "eval/loss"):
        assert client.get_metric_history(run_id, metric), metric
    mix = {m.step: m.value for m in client.get_metric_history(run_id, "mixture/arithmetic")}
    assert mix[0] == 0.1 and mix[max(mix)] == 0.6  # the mixture moved toward the high tier
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert lrs[0] == 0.0 and max(lrs.values()) == 0.003 and lrs[max(lrs)] < 0.003
    artifacts = _all_artifacts(client, run_id)
    assert {"spec.json", "manifest.json", "job.log"} <= {Path(a).name for a in artifacts}
    assert len([a for a in artifacts if a.endswith(".png")]) >= 2  # LR and mixture plots
    for metric in ("round/accepted", "round/revised", "accepted", "rejected"):
        assert client.get_metric_history(stages["sft_data"].info.run_id, metric), metric
    assert {"samples.jsonl", "samples_table.json"} <= set(
        _all_artifacts(client, stages["sft_data"].info.run_id))
    for metric in ("loss", "heldout/loss", "lr"):
        assert client.get_metric_history(stages["sft"].info.run_id, metric), metric
    for metric in ("loss/dpo", "loss/positive_kd", "loss/negative_kd", "dpo/accuracy",
                   "dpo/margin", "pairs/kept", "heldout/kd_positive"):
        assert client.get_metric_history(stages["distill"].info.run_id, metric), metric
    assert "pairs.jsonl" in _all_artifacts(client, stages["distill"].info.run_id)
    for name in ("rl.stem", "rl.code", "rl.align"):
        assert client.get_metric_history(stages[name].info.run_id, "filter/dropped_share")
    for name in EVALS:
        assert client.get_metric_history(stages[name].info.run_id, "eval/exact_match")
        assert "eval_samples.jsonl" in _all_artifacts(client, stages[name].info.run_id)


def _all_artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _all_artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_rerun_skips_everything_in_seconds(tiny_run):
    workdir = tiny_run[0]
    start = time.monotonic()
    result = pipeline("run", str(TINY), f"workdir={workdir}", *SHORTER)
    seconds = time.monotonic() - start
    assert result.returncode == 0
    assert result.stdout.count("skip (done)") == len(STAGES) and "nothing to run" in result.stdout
    assert seconds < 15  # measured ~1 s; generous for a loaded CI machine
    status = pipeline("status", str(TINY), f"workdir={workdir}", *SHORTER).stdout
    assert [line.split()[2] for line in status.splitlines()[1:]] == ["done"] * len(STAGES)


def test_override_reruns_only_the_changed_stage(tiny_run):
    workdir = tiny_run[0]
    before = {n: [d.name for d in ds] for n, ds in stage_dirs(workdir).items()}
    mtimes = {d: (d / "manifest.json").stat().st_mtime
              for n in STAGES if n != "eval_sft" for d in stage_dirs(workdir)[n]}
    result = pipeline("run", str(TINY), f"workdir={workdir}", *SHORTER, "stages.eval_sft.samples=3",
                      "stages.eval_sft.k=[1,3]")
    assert result.returncode == 0, result.stdout[-3000:]
    after = {n: [d.name for d in ds] for n, ds in stage_dirs(workdir).items()}
    assert all(after[n] == before[n] for n in STAGES if n != "eval_sft")
    assert len(after["eval_sft"]) == 2  # a new eval dir next to the old one
    assert result.stdout.count("skip (done)") == len(STAGES) - 1
    assert all((d / "manifest.json").stat().st_mtime == t for d, t in mtimes.items())
