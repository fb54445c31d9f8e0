"""The local launcher's reading of how a job ended: exit code + manifest + the job's exit.json."""

import json
import signal

from launch.local import job_result


def write(d, name, obj):
    (d / name).write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def test_done_needs_exit_0_and_a_manifest(tmp_path):
    assert job_result(tmp_path, 0).status == "failed"  # exit 0 but nothing produced
    write(tmp_path, "manifest.json", {"stage": "s"})
    assert job_result(tmp_path, 0).status == "done"


def test_preempted_is_read_from_exit_json_whatever_torchrun_returned(tmp_path):
    write(tmp_path, "exit.json", {"status": "preempted"})
    result = job_result(tmp_path, 1)  # torchrun turns the worker's 75 into 1
    assert result.status == "preempted" and "rerun to resume" in result.error


def test_failure_carries_the_jobs_error_or_the_signal(tmp_path):
    write(tmp_path, "exit.json", {"status": "failed", "error": "ValueError: bad shard"})
    assert job_result(tmp_path, 1).error == "ValueError: bad shard"
    (tmp_path / "exit.json").unlink()
    assert job_result(tmp_path, -signal.SIGKILL).error == "killed by SIGKILL"
    write(tmp_path, "job.log", "...\n  exitcode  : -9 (pid: 123)\n...")
    assert job_result(tmp_path, 1).error == "a worker was killed by SIGKILL"
    write(tmp_path, "job.log", "Traceback ...\n")
    assert job_result(tmp_path, 1).error == "exited with code 1"
    assert job_result(tmp_path, 1).log == str(tmp_path / "job.log")


def test_a_second_job_on_a_held_stage_dir_fails_naming_the_holder_and_touches_nothing(tmp_path):
    """One job per stage dir: the rank-0 worker flocks `job.lock`; a second job waits (here 1 s)
    for the holder to end, then exits 1 naming it, writing no exit.json and no manifest."""
    import fcntl
    import os
    import subprocess
    import sys

    from stages.contract import StageSpec, save_spec

    spec = save_spec(StageSpec(name="s", kind="noop", config={"kind": "noop"},
                               output_dir=str(tmp_path)))
    fd = os.open(tmp_path / "job.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live job holds it
    os.write(fd, b"pid 4242 on node7, since 2026-11-30 10:00:00")
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.noop", "--spec", str(spec)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PIPELINE_JOB_LOCK_WAIT_S": "1"})
    finally:
        os.close(fd)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "waiting up to 1s for the job that holds" in proc.stdout
    assert (f"s: {tmp_path} is in use by another job (pid 4242 on node7, since 2026-11-30 "
            "10:00:00); stop it first") in proc.stderr
    assert not (tmp_path / "exit.json").exists() and not (tmp_path / "manifest.json").exists()
    # once the holder is gone, the same job runs
    done = subprocess.run([sys.executable, "-m", "stages.noop", "--spec", str(spec)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pid" in (tmp_path / "job.lock").read_text()


def test_one_process_starts_without_torchrun_and_its_exit_codes_reach_the_launcher(tmp_path):
    """nproc_per_node 1: the worker is started as it is (no torchrun agent) and is the job
    (job.pid = workers/0.pid); its own exit code and exit.json come back, a done job is done and
    a failing one fails with its error. Several processes still go through torchrun."""
    from launch.config import LaunchConfig
    from launch.local import command, job_processes, run_job
    from stages.contract import StageSpec, save_spec

    def spec(name, **config):
        made = StageSpec(name=name, kind="noop", config={"kind": "noop", **config},
                         output_dir=str(tmp_path / name))
        save_spec(made)
        return made

    ok, bad = spec("ok"), spec("bad", fail=True, fail_message="boom")
    assert command(ok, LaunchConfig())[1:3] == ["-m", "stages.noop"]
    assert "torch.distributed.run" in command(ok, LaunchConfig(nproc_per_node=2))
    done = run_job(ok, LaunchConfig())
    assert done.status == "done", open(done.log).read()
    assert (ok.out / "job.pid").read_text() == (ok.out / "workers" / "0.pid").read_text()
    assert job_processes(ok.out) == []  # nothing of it left running
    failed = run_job(bad, LaunchConfig())
    assert (failed.status, failed.exit_code, failed.error) == ("failed", 1, "RuntimeError: boom")
