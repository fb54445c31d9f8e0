import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# recipes/nanbeige3b.yaml asks for its teacher and judge endpoints by environment variable; the
# tests only validate and plan it, which sends nothing (`pipeline run` probes served teachers)
os.environ.setdefault("NANBEIGE_TEACHER_URL", "http://127.0.0.1:9/v1")
os.environ.setdefault("NANBEIGE_JUDGE_URL", "http://127.0.0.1:9/v1")

REPO = Path(__file__).resolve().parents[1]


def default_sigint() -> None:
    """`preexec_fn` of a driver that a test will Ctrl-C: a shell that starts pytest in the
    background makes it ignore SIGINT, children inherit that, and the driver would never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a YAML recipe (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world of one) + Megatron parallel state, with the CPU compat patches."""
    from stages.engine import distributed

    info = distributed.init(seed=0)
    yield info
    distributed.teardown()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster (private munged + slurmctld + slurmd) for this test session.

    Installs the Debian packages when they are missing and we are root (as in CI); skips only
    when that cannot be done. SLURM_CONF points the client commands at it while it runs."""
    from slurm_cluster import SlurmCluster, ensure_installed

    why_not = ensure_installed()
    if why_not:
        pytest.skip(why_not)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


# --- stage jobs run as the launcher runs them -----------------------------------------------------

def start_job(module: str, spec: Path) -> subprocess.Popen:
    """`python -m <module> --spec spec` in its own session (one thread), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", module, "--spec", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish_job(proc: subprocess.Popen, expect: int = 0, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, out[-4000:]
    return out


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    from stages.engine.checkpoint import latest_checkpoint

    deadline = time.time() + timeout
    while latest_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, "job ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)


def sigkill_at_first_checkpoint_then_rerun(module: str, spec: Path) -> str:
    """SIGKILL a job's whole process group once it has a checkpoint, rerun it to the end; the
    rerun's output (which says where it resumed from)."""
    out_dir = spec.parent
    proc = start_job(module, spec)
    wait_for_checkpoint(out_dir, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out_dir / "manifest.json").exists(), "finished before it was killed"
    out = finish_job(start_job(module, spec))
    assert "resumed from" in out
    return out


# The longest files (minutes each on 2 cores) start first, then the other stage-job tests: with two
# workers taking a file at a time, a long file started last would run alone at the end.
LONGEST_FIRST = ("test_tiny_pipeline.py", "test_nanbeige3b_cpu.py", "test_slurm.py",
                 "test_tracking_outage.py", "test_runner.py", "test_install.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        if item.path.name in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.name)
        return len(LONGEST_FIRST) + (item.get_closest_marker("slow") is None)

    items.sort(key=rank)
