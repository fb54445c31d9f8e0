"""recipes/nanbeige3b_cpu.yaml, the flagship's CPU twin: the same graph as recipes/nanbeige3b.yaml,
and it runs end to end the way the README shows: `--until eval_base`, serve the twin's pretrained
checkpoint as teacher and judge (stages/serve.py), then the rest; a rerun skips everything."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, default_sigint
from pipeline.cli import main
from pipeline.graph import build_graph
from pipeline.validate import load_recipe

FLAGSHIP = REPO / "recipes" / "nanbeige3b.yaml"
TWIN = REPO / "recipes" / "nanbeige3b_cpu.yaml"


def shape(recipe: Path) -> dict[str, tuple]:
    """Each stage's kind and edges (reference field -> upstream stage, and `after`)."""
    graph = build_graph(load_recipe(recipe))
    return {name: (node.kind, sorted(node.refs.items()), sorted(node.after))
            for name, node in graph.items()}


def test_the_twin_has_the_flagships_stages_kinds_and_edges():
    twin, flagship = shape(TWIN), shape(FLAGSHIP)
    assert list(twin) == list(flagship)  # the same stages in the same order
    assert twin == flagship
    recipe = load_recipe(TWIN)
    assert recipe.launcher.kind == "local" and load_recipe(FLAGSHIP).launcher.kind == "slurm"


def test_the_twins_data_files_are_the_scripts_output(tmp_path):
    """recipes/data/nanbeige3b_cpu/ is what recipes/data/make_nanbeige3b_cpu.py writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_twin", REPO / "recipes" / "data" / "make_nanbeige3b_cpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.OUT = tmp_path
    script.main()
    shipped = REPO / "recipes" / "data" / "nanbeige3b_cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for p in tmp_path.iterdir():
        assert p.read_bytes() == (shipped / p.name).read_bytes(), p.name


def test_a_missing_dataset_file_is_one_line_naming_the_key(capsys, tmp_path):
    assert main(["plan", str(TWIN), f"workdir={tmp_path}",
                 "stages.distill.prompts.path=recipes/data/nope.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stages.distill.prompts.path: ") and err.endswith(
        "recipes/data/nope.jsonl does not exist") and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists()


def pipeline(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("twin") / "wd"
    start = time.monotonic()
    # The stages up to eval_base do not use the teacher/judge URL (the recipe's default stands in).
    first = pipeline("run", str(TWIN), f"workdir={workdir}", "--until", "eval_base")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    pretrain, = workdir.glob("pretrain-*")
    # Port 0: the server binds a free port itself. A port reserved here before the 5-minute first
    # run was once taken meanwhile by the other test worker's processes (CI, stop 26).
    server = subprocess.Popen(
        [sys.executable, "-m", "stages.serve", "--stage-dir", str(pretrain), "--max-model-len",
         "1024", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        lines = []  # warnings may come first
        while not (lines and lines[-1].startswith("serving")) and server.poll() is None:
            lines.append(server.stdout.readline())
        assert lines[-1].startswith(f"serving {pretrain.name} as teacher, judge at "), lines
        url = lines[-1].split(" at ", 1)[1].split()[0]
        env = {**os.environ, "NANBEIGE_TEACHER_URL": url, "NANBEIGE_JUDGE_URL": url}
        rest = pipeline("run", str(TWIN), f"workdir={workdir}", env=env)
        seconds = time.monotonic() - start
        assert rest.returncode == 0, rest.stdout[-3000:] + rest.stderr[-3000:]
        rerun_start = time.monotonic()
        rerun = pipeline("run", str(TWIN), f"workdir={workdir}", env=env)
        rerun_seconds = time.monotonic() - rerun_start
    finally:
        server.terminate()
        server.wait(timeout=30)
    return workdir, first.stdout + rest.stdout, seconds, rerun, rerun_seconds


@pytest.mark.slow
def test_the_twin_runs_end_to_end_with_an_eval_after_every_stage(twin_run):
    workdir, log, seconds, _, _ = twin_run
    print(f"nanbeige3b_cpu: {seconds:.0f} s")
    names = list(shape(TWIN))
    runs = {}
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("nanbeige3b_cpu")
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        runs[r.info.run_name] = r  # the last run of each name
    assert set(names) <= set(runs)
    for name in names:
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert run.data.metrics, name
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"spec.json", "manifest.json"} <= files, (name, files)
    graph = build_graph(load_recipe(TWIN))
    trained = {n for n, node in graph.items() if node.kind in ("pretrain", "sft", "distill", "rl")}
    for name, node in graph.items():
        if node.kind == "eval":
            metrics = runs[name].data.metrics
            for bench in ([b.name for b in node.config.benchmarks]):
                assert f"eval/{bench}/accuracy" in metrics, (name, bench)
    assert trained <= {node.config.init for node in graph.values() if node.kind == "eval"}
    manifest = lambda n: json.loads(next(workdir.glob(f"{n}-*/manifest.json")).read_text())  # noqa
    data = manifest("sft_data")
    assert data["accepted"] > 0  # the served refinement roles produced SFT data
    assert manifest("distill")["pairs_kept"] > 0  # DPD trained on the served teacher's answers
    assert manifest("rl.align")["filter_kept"] > 0  # the served judge scored rollouts
    assert (next(workdir.glob("export-*")) / "hf" / "config.json").exists()
    table = log.rsplit("eval ladder (DAG order):\n", 1)[1].splitlines()  # the second run's
    evals = [n for n, node in graph.items() if node.kind == "eval"]
    assert [line.split()[0] for line in table[1:1 + len(evals)]] == evals


@pytest.mark.slow
def test_a_rerun_of_the_twin_skips_everything_in_seconds(twin_run):
    _, _, _, rerun, rerun_seconds = twin_run
    print(f"nanbeige3b_cpu rerun: {rerun_seconds:.1f} s")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "starting:" not in rerun.stdout
    assert rerun_seconds < 60


def test_the_flagship_plans_without_touching_anything_and_dry_runs_every_stage_on_slurm(
        tmp_path, capsys):
    stages = shape(FLAGSHIP)
    n = len(stages)
    assert main(["plan", str(FLAGSHIP), f"workdir={tmp_path / 'plan'}"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "plan").exists()
    for name, (kind, _, _) in stages.items():
        assert f"\n{name} [{kind}]" in out, name
    gpu_line, = [line for line in out.splitlines() if line.startswith("GPU-hours per stage: ")]
    for name, (kind, _, _) in stages.items():
        if kind in ("pretrain", "sft", "distill", "rl", "eval"):
            assert f" {name} " in gpu_line, name
    assert "assumptions: 40% MFU of 989 TFLOP/s" in out
    assert main(["run", str(FLAGSHIP), f"workdir={tmp_path / 'dry'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == n and out.count("#SBATCH --job-name=") == n
    assert "\nlocal:" not in out  # every stage is a Slurm job on the cluster


@pytest.mark.slow
def test_ctrl_c_during_pretrain_then_rerun_gives_bitwise_the_same_model(twin_run):
    """After the run above (it shares it): Ctrl-C of the driver mid-pretraining preempts the job
    at a checkpoint; a rerun resumes it to bitwise the same parameters."""
    workdir = twin_run[0]
    pretrain_dir, = workdir.glob("pretrain-*")
    expected = json.loads((pretrain_dir / "manifest.json").read_text())["params_sha256"]
    shutil.rmtree(pretrain_dir)
    args = [sys.executable, "-m", "pipeline.cli", "run", str(TWIN), f"workdir={workdir}",
            "--until", "pretrain"]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO, preexec_fn=default_sigint)
    ckpts = pretrain_dir / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (ckpts.exists() and any(
            p.name.startswith("step-") and not p.name.endswith(".tmp") for p in ckpts.iterdir())):
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out[-3000:]
    assert json.loads((pretrain_dir / "exit.json").read_text())["status"] == "preempted"
    assert not (pretrain_dir / "manifest.json").exists()

    result = pipeline("run", str(TWIN), f"workdir={workdir}", "--until", "pretrain")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resum" in (pretrain_dir / "job.log").read_text().lower()
    assert json.loads((pretrain_dir / "manifest.json").read_text())["params_sha256"] == expected
