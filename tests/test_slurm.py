"""The Slurm launcher on a real one-node Slurm cluster (tests/slurm_cluster.py): the tiny pretrain
stage as a Slurm job, `scontrol requeue` and a time limit mid-training (both end bitwise equal to
an uninterrupted local run), a failing job, killed and interrupted drivers (`pipeline submit`,
Ctrl-C) whose successors re-attach, a Ray cluster inside a job; and, without a cluster, the
sbatch script of the 3B recipe's multi-node GPU stage, `--dry-run`, the end-state mapping and
launcher config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from conftest import default_sigint
from launch import local, slurm
from pipeline.cli import main
from pipeline.state import LockedError, WorkdirLock
from launch.config import LaunchConfig
from stages.contract import StageSpec, load_spec, read_json, save_spec
from test_pretrain import CONFIG, MODEL, make_prepared

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # same threads as the reference run
FAST = dict(kind="slurm", mem="2000M", cpus_per_node=1, poll_s=0.5)
# test_pretrain's tiny run made 6x longer (144 steps, ~10 s of training here), so that a requeue
# or time limit sent after the first checkpoint lands mid-training
K = 6
LONGER = replace(CONFIG, phases=[replace(p, tokens=p.tokens * K) for p in CONFIG.phases],
                 lr=replace(CONFIG.lr, warmup_tokens=CONFIG.lr.warmup_tokens * K,
                            decay_tokens=CONFIG.lr.decay_tokens * K),
                 checkpoint_every=16, log_every=16)


def write_spec(out: Path, data: Path) -> Path:
    return save_spec(StageSpec(name="pretrain", kind="pretrain", config=asdict(LONGER),
                               output_dir=str(out), inputs={"tokenizer": str(data), "data": str(data)},
                               model=asdict(MODEL)))


def scontrol_job(job_id: str) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, check=True).stdout
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def in_background(fn, *args):
    """Run fn(*args) in a thread; returns a function that waits for and returns its result."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn(*args)), daemon=True)
    thread.start()

    def result(timeout=240):
        thread.join(timeout)
        assert not thread.is_alive(), "the launcher did not return"
        return box["result"]

    return result


def wait_until(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def lock_free(workdir: Path) -> bool:
    try:
        with WorkdirLock(workdir):
            return True
    except LockedError:
        return False


def job_processes(out: Path) -> list:
    """torchrun and the workers of the stage job whose output dir is `out`."""
    import psutil

    spec = str(out / "spec.json")
    procs = [p for p in psutil.process_iter(["cmdline"]) if spec in " ".join(p.info["cmdline"] or [])]
    assert procs, "the job is not running"
    return procs


def first_checkpoint(out: Path) -> bool:
    from stages.engine.checkpoint import latest_checkpoint

    return latest_checkpoint(out / "checkpoints") is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> dict:
    """The tiny pretrain stage run uninterrupted by the local launcher."""
    out = tmp_path_factory.mktemp("local")
    result = local.run_job(load_spec(write_spec(out, data)), LaunchConfig(), ENV)
    assert result.status == "done", (out / "job.log").read_text()[-3000:]
    return read_json(out / "manifest.json")


def test_scontrol_requeue_mid_training_resumes_to_the_same_parameters(slurm_cluster, reference,
                                                                      data, tmp_path):
    spec = load_spec(write_spec(tmp_path, data))
    started = time.monotonic()
    result = in_background(slurm.run_job, spec, LaunchConfig(**FAST), ENV)
    wait_until(lambda: first_checkpoint(tmp_path), what="the first checkpoint")
    job_id = read_json(tmp_path / slurm.JOB_FILE)["job_id"]
    requeued = time.monotonic()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_until(lambda: "(restart 1)" in (tmp_path / "job.log").read_text(), 60, "the restart")
    print(f"requeue -> running again: {time.monotonic() - requeued:.1f} s")
    ended = result()
    print(f"stage through Slurm with one requeue: {time.monotonic() - started:.1f} s")

    log = (tmp_path / "job.log").read_text()
    assert ended.status == "done", log[-3000:]
    manifest = read_json(tmp_path / "manifest.json")
    assert manifest["params_sha256"] == reference["params_sha256"]
    assert manifest["eval_losses"] == reference["eval_losses"]
    assert "resum" in log.split("(restart 1)", 1)[1].lower()  # the second start resumed
    assert "SLURM_RESTART_COUNT=1" in log  # logged by the job itself
    assert scontrol_job(job_id)["Restarts"] == "1"
    assert read_json(tmp_path / slurm.JOB_FILE)["jobs"] == [job_id]  # Slurm's requeue, no resubmit
    assert (tmp_path / "sbatch.sh").read_text() == slurm.render_script(
        tmp_path, "pretrain", LaunchConfig(**FAST))


def test_a_job_killed_by_its_time_limit_is_resubmitted_and_resumes(slurm_cluster, reference, data,
                                                                   tmp_path):
    # no warning signal before the limit: the job really ends TIMEOUT and the driver resubmits it
    launcher = LaunchConfig(**FAST, time="10", signal_grace_s=0)
    spec = load_spec(write_spec(tmp_path, data))
    result = in_background(slurm.run_job, spec, launcher, ENV)
    wait_until(lambda: first_checkpoint(tmp_path), what="the first checkpoint")
    job_id = read_json(tmp_path / slurm.JOB_FILE)["job_id"]
    # Time limits are in minutes: move the job's end to now instead of waiting one out. slurmctld
    # enforces limits every 30 s or so, longer than this job trains: freeze it meanwhile
    # (SIGSTOP; Slurm's SIGCONT+SIGTERM at the limit wakes it), so the limit lands mid-training.
    frozen = job_processes(tmp_path)
    for proc in frozen:
        proc.suspend()
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "EndTime=now"], check=True)
    ended = result()

    log = (tmp_path / "job.log").read_text()
    assert ended.status == "done", log[-3000:]
    assert scontrol_job(job_id)["JobState"] == "TIMEOUT"
    assert "resumed from" in log.split("(restart 0)")[2]  # the resubmitted job's start
    jobs = read_json(tmp_path / slurm.JOB_FILE)["jobs"]
    assert len(jobs) == 2 and jobs[0] == job_id
    assert f"slurm job {job_id} ended TIMEOUT: resubmitting" in log
    assert read_json(tmp_path / "manifest.json")["params_sha256"] == reference["params_sha256"]


def test_a_failing_job_fails_the_stage_with_its_slurm_state_and_log(slurm_cluster, tmp_path):
    spec = StageSpec(name="broken", kind="noop", config={"fail": True,
                                                         "fail_message": "bad shard 7"},
                     output_dir=str(tmp_path))
    save_spec(spec)
    ended = slurm.run_job(spec, LaunchConfig(**FAST))
    job_id = read_json(tmp_path / slurm.JOB_FILE)["job_id"]
    assert ended.status == "failed"
    assert ended.error.startswith(f"slurm job {job_id} ended FAILED (exit code 1:0)")
    assert ended.error.endswith("RuntimeError: bad shard 7")
    assert ended.log == str(tmp_path / "job.log")
    assert "RuntimeError: bad shard 7" in Path(ended.log).read_text()
    assert read_json(tmp_path / slurm.JOB_FILE)["jobs"] == [job_id]  # a real failure: no resubmit


RECIPE = """
    name: sl
    workdir: {workdir}
    launcher: {{kind: slurm, mem: 1000M, cpus_per_node: 1, poll_s: 0.5}}
    stages:
      slow: {{kind: noop, seconds: {seconds}}}
"""


def test_drivers_killed_or_interrupted_leave_the_job_and_the_next_one_reattaches(
        slurm_cluster, write_recipe, tmp_path, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(RECIPE.format(workdir=workdir, seconds=50))
    # driver 1 as a Slurm job (`pipeline submit`): it submits the stage's job from inside its own
    assert main(["submit", str(recipe), "--cpus=1", "--mem=1500M"]) == 0
    driver = capsys.readouterr().out.split("slurm job ", 1)[1].split(";")[0]
    wait_until(lambda: list(workdir.glob(f"slow-*/{slurm.JOB_FILE}")), 120, "the stage's job")
    (stage_dir,) = workdir.glob("slow-*")
    job_id = read_json(stage_dir / slurm.JOB_FILE)["job_id"]
    subprocess.run(["scancel", driver], check=True)  # kill driver 1: the stage job runs on
    wait_until(lambda: scontrol_job(driver)["JobState"] == "CANCELLED" and lock_free(workdir), 60,
               "the driver's end")  # its processes go after KillWait (SIGTERM, then SIGKILL)
    assert "pipeline 'sl': 1 stages" in (workdir / "driver.log").read_text()
    assert main(["status", str(recipe)]) == 0
    status = capsys.readouterr().out
    assert f"slurm job {job_id}" in status and " running " in status

    # driver 2 re-attaches, then gets Ctrl-C: it leaves the job running and says so
    driver2 = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(recipe)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               preexec_fn=default_sigint)
    wait_until(lambda: f"re-attaching to slurm job {job_id}" in (stage_dir / "job.log").read_text(),
               120, "driver 2 to re-attach")
    driver2.send_signal(signal.SIGINT)
    out, _ = driver2.communicate(timeout=60)
    assert driver2.returncode == 130, out
    assert f"re-attach to slurm job {job_id}" in out
    assert f"slurm job {job_id} left running; `pipeline run` again re-attaches" in out
    assert scontrol_job(job_id)["JobState"] == "RUNNING"

    # driver 3 re-attaches and sees the job to its end: one submission in all
    assert main(["run", str(recipe)]) == 0
    assert read_json(stage_dir / slurm.JOB_FILE)["jobs"] == [job_id]
    assert scontrol_job(job_id)["JobState"] == "COMPLETED"
    assert (stage_dir / "manifest.json").exists()
    # the stage's MLflow run holds the sbatch script next to its spec
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = read_json(stage_dir / "mlflow_run.json")["run_id"]
    assert {"spec.json", "sbatch.sh"} <= {f.path for f in client.list_artifacts(run_id)}


def test_dry_run_writes_and_prints_the_scripts_and_submits_nothing(write_recipe, tmp_path, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(RECIPE.format(workdir=workdir, seconds=30)
                          + "      after: {kind: noop, input: slow, launcher: {kind: local}}\n")
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    (stage_dir,) = workdir.glob("slow-*")
    script = (stage_dir / "sbatch.sh").read_text()
    assert script in out
    assert "#SBATCH --mem=1000M" in script
    assert not (stage_dir / slurm.JOB_FILE).exists()
    assert "after" in out and "local: " in out  # the local stage shows its command


def test_sbatch_script_of_the_3b_recipes_multi_node_gpu_stage(tmp_path, monkeypatch):
    from pipeline.graph import build_graph
    from pipeline.validate import load_recipe

    monkeypatch.chdir(tmp_path)  # the recipe's relative workdir lands here
    graph = build_graph(load_recipe(REPO / "recipes" / "nanbeige3b.yaml"))
    node = graph["pretrain"]
    script = slurm.render_script(node.output_dir, node.kind, node.launcher)
    lines = script.splitlines()
    out = node.output_dir
    assert lines[0] == "#!/bin/bash"
    sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert sbatch[:10] == [f"--job-name={out.name}", f"--output={out}/job.log",
                           f"--error={out}/job.log", "--open-mode=append", "--requeue",
                           f"--chdir={out}", "--nodes=32", "--ntasks-per-node=1",
                           "--cpus-per-task=64", "--gpus-per-node=8"]
    assert {"--mem=0", "--time=2-00:00:00", "--signal=USR1@600", "--exclusive"} <= set(sbatch)
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task=64 ")
    for part in ("-m torch.distributed.run --nnodes=$SLURM_NNODES --rdzv-backend=c10d "
                 "--rdzv-endpoint=$head:29500 --rdzv-id=$SLURM_JOB_ID --nproc-per-node=8",
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "--shutdown-timeout=600", f"-m stages.pretrain --spec {out}/spec.json"):
        assert part in srun
    assert lines.index(srun) < lines.index("code=$?")
    assert '    scontrol requeue "$SLURM_JOB_ID" && exit 0' in lines
    # each of the 8 workers gets its eighth of the node's 64 CPUs as torch threads
    (threads,) = [line for line in lines if line.startswith("export OMP_NUM_THREADS=")]
    assert lines.index(threads) < lines.index(srun)
    for cpus, want in ((64, "8"), (4, "1"), (None, "1")):
        got = subprocess.run(["bash", "-c", f"{threads}; echo $OMP_NUM_THREADS"], text=True,
                             capture_output=True, check=True,
                             env={"SLURM_CPUS_ON_NODE": str(cpus)} if cpus else {}).stdout
        assert got.strip() == want, (cpus, got)
    # a bash syntax check of the whole script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_a_ray_cluster_inside_the_allocation_serves_the_stage(slurm_cluster, tmp_path):
    from slurm_cluster import _free_port

    port = _free_port()
    spec = StageSpec(name="rayjob", kind="noop", config={"seconds": 1.0}, output_dir=str(tmp_path))
    save_spec(spec)
    launcher = LaunchConfig(**FAST, ray_cluster=True, ray_port=port)
    ended = slurm.run_job(spec, launcher, {"PIPELINE_RAY_ADDRESS": "the-drivers-ray:1"})
    log = (tmp_path / "job.log").read_text()
    assert ended.status == "done", log[-3000:]
    # the stage was pointed at the Ray head started in its own job, not at the driver's Ray
    assert read_json(tmp_path / "manifest.json")["ray_address"].endswith(f":{port}")
    assert "Active:" in log and " 1 node_" in log  # `ray status` of that cluster, in the job log
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"])
                if f"--port={port}" in " ".join(p.info["cmdline"] or [])], "Ray was not stopped"
    current = Path("/tmp/ray/ray_current_cluster")
    assert not current.exists() or f":{port}" not in current.read_text()


def test_how_an_ended_job_maps_to_the_stage(tmp_path):
    """No cluster needed: the mapping of a Slurm end state + the job's exit.json/manifest."""
    def ended(state, exit_status=None, manifest=False):
        for name in ("exit.json", "manifest.json"):
            (tmp_path / name).unlink(missing_ok=True)
        if exit_status:
            (tmp_path / "exit.json").write_text(json.dumps(exit_status))
        if manifest:
            (tmp_path / "manifest.json").write_text("{}")
        return slurm._ended(tmp_path, "7", slurm.SlurmJob("7", state, "None", "0:15"))

    assert ended("COMPLETED", {"status": "done"}, manifest=True).status == "done"
    for state in ("TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL"):
        assert ended(state) is None  # resubmit: it resumes from its checkpoint
    assert ended("FAILED", {"status": "preempted"}) is None  # checkpointed, could not requeue
    cancelled = ended("CANCELLED", {"status": "preempted"})  # scancel: never resubmitted
    assert cancelled.status == "failed" and "slurm job 7 ended CANCELLED (exit code 0:15)" in cancelled.error
    assert ended("COMPLETED").status == "failed"  # exit 0 without a manifest
    oom = ended("OUT_OF_MEMORY", {"status": "failed", "error": "MemoryError: "})
    assert oom.error == "slurm job 7 ended OUT_OF_MEMORY (exit code 0:15): MemoryError: "


@pytest.mark.parametrize("override, error", [
    ("launcher.time=abc", "error: launcher.time: 'abc' is not a Slurm time limit"),
    ("launcher.extra_sbatch=[exclusive]", "error: launcher.extra_sbatch: 'exclusive' is not an "
                                          "sbatch option"),
    ("stages.pretrain.launcher={mem: lots}", "error: stages.pretrain.launcher.mem: 'lots' is not "
                                             "a Slurm memory size"),
    ("stages.pretrain.launcher={partitio: gpu}", "error: stages.pretrain.launcher.partitio: "),
])
def test_bad_launcher_settings_are_one_line_errors_naming_the_key(override, error, capsys):
    assert main(["plan", str(REPO / "recipes" / "nanbeige3b.yaml"), override]) == 2
    assert capsys.readouterr().err.startswith(error)
