"""The workdir's run lease: a live driver, here or on another host, is refused; a dead one's lease
(gone pid, stale heartbeat, or our own Slurm job before a requeue) is taken over, and says so."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline import state
from pipeline.state import LockedError, WorkdirLock


def write_lease(workdir, **fields):
    workdir.mkdir(parents=True, exist_ok=True)
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
             "heartbeat": time.time(), "slurm_job": "", **fields}
    (workdir / ".pipeline.lock").write_text(json.dumps(lease))


def test_a_live_driver_on_another_host_is_refused(tmp_path):
    write_lease(tmp_path, host="node-other", pid=1234, heartbeat=time.time() - 5)
    with pytest.raises(LockedError, match=r"in use by another `pipeline run` \(pid 1234 on "
                                          r"node-other, heartbeat 5s ago\)"):
        with WorkdirLock(tmp_path):
            pass
    assert json.loads((tmp_path / ".pipeline.lock").read_text())["host"] == "node-other"


def test_a_stale_lease_from_another_host_is_taken_over(tmp_path, capsys):
    write_lease(tmp_path, host="node-other", pid=1234, heartbeat=time.time() - 3600)
    with WorkdirLock(tmp_path):
        held = json.loads((tmp_path / ".pipeline.lock").read_text())
        assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    err = capsys.readouterr().err
    assert "taking over the run lock" in err and "pid 1234 on node-other" in err
    assert "no heartbeat for 3600s" in err
    assert not (tmp_path / ".pipeline.lock").exists()  # released on exit


def test_a_dead_driver_on_this_host_is_taken_over_at_once(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lease(tmp_path, pid=dead.pid)  # a fresh heartbeat, but its process is gone
    with WorkdirLock(tmp_path):
        pass
    assert f"pid {dead.pid} is gone" in capsys.readouterr().err


def test_our_own_slurm_job_requeued_onto_another_node_takes_its_lease_back(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_lease(tmp_path, host="node-before-requeue", pid=77, slurm_job="4242")  # fresh
    with WorkdirLock(tmp_path):
        pass
    assert "this Slurm job's (4242) from before a requeue" in capsys.readouterr().err


def test_the_heartbeat_is_renewed_while_the_run_lasts(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.05)
    with WorkdirLock(tmp_path):
        first = json.loads((tmp_path / ".pipeline.lock").read_text())["heartbeat"]
        time.sleep(0.5)
        later = json.loads((tmp_path / ".pipeline.lock").read_text())["heartbeat"]
        assert later > first
        with pytest.raises(LockedError):  # a live one on this host is refused, as before
            with WorkdirLock(tmp_path):
                pass
