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
