"""Installing beside a torch that is already there (a GPU cluster's own CUDA build), and what a
cluster user then sees in MLflow (system metrics, the git commit).

What the install tests prove, and what they cannot:
- pip keeps a torch of another version that was installed first — a plain 2.11.0 and an
  NGC-style pre-release with a local tag (2.11.0a0+ecf3bae40a) — when the project is installed
  with the `test` extra (trl pulls accelerate, which asks for torch>=2.0); and with the `cpu` extra
  it would install the pinned 2.13.0 (the control: the check can fail). Those two torches are
  stand-ins (a wheel with metadata and an empty module: only the CPU wheel 2.13.0 exists on this
  machine, PyPI's Linux wheels are multi-GB CUDA builds), so this proves pip's resolution, not
  that our code runs on torch 2.11.
- the project installed into a fresh environment whose torch was there first (this machine's
  2.13.0+cpu, seen through --system-site-packages) leaves that torch where it was, and the tiny
  pretrain runs in that environment, to its last step. Running on a different torch build
  (torch 2.11, CUDA) is what bench/gpu_check.py does on a GPU machine.
Nothing is downloaded: pip runs with --no-index (the project's dependencies are already installed
here; find-links /opt/wheels holds the CPU torch for the control).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OTHER_TORCHES = ["2.11.0", "2.11.0a0+ecf3bae40a"]


def fake_torch_wheel(root: Path, version: str) -> Path:
    """A wheel named torch at `version`: metadata and an `__init__` that says its version."""
    wheel = root / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {"torch/__init__.py": f"__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def make_venv(path: Path) -> Path:
    """A fresh venv that sees this machine's packages (its torch included) and its pip."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(path)], check=True)
    return path / "bin" / "python"


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([str(python), "-m", "pip", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def torch_of(python: Path) -> tuple[str, str]:
    out = subprocess.run([str(python), "-c", "import torch; print(torch.__version__); "
                          "print(torch.__file__)"], capture_output=True, text=True, check=True)
    version, where = out.stdout.split()
    return version, where


def to_install(python: Path, report: Path, extras: str) -> dict[str, str]:
    """What `pip install <project>[extras]` would install: name -> version (a dry run)."""
    pip(python, "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet",
        "--report", str(report), f"{REPO}[{extras}]")
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow  # two venvs, three pip resolutions (~40 s)
@pytest.mark.parametrize("version", OTHER_TORCHES)
def test_pip_keeps_a_torch_of_another_version_installed_first(tmp_path, version):
    python = make_venv(tmp_path / "venv")
    pip(python, "install", "--no-deps", "--no-index", str(fake_torch_wheel(tmp_path, version)))
    assert torch_of(python)[0] == version

    assert "torch" not in to_install(python, tmp_path / "test.json", "test")
    pip(python, "install", "--no-index", "--no-build-isolation", "--quiet", f"{REPO}[test]")
    assert torch_of(python)[0] == version
    assert str(tmp_path / "venv") in torch_of(python)[1]

    # the control: the CPU path's extra does replace it, so the check above could have failed
    assert to_install(python, tmp_path / "cpu.json", "cpu,test").get("torch", "").startswith("2.13.0")


@pytest.mark.slow  # a venv, an editable install and a 24-step pretrain job (~60 s)
def test_installed_beside_a_preinstalled_torch_the_tiny_pretrain_runs_on_it(tmp_path):
    from test_pretrain import TOTAL_STEPS, make_prepared, write_spec

    import torch

    python = make_venv(tmp_path / "venv")
    before = torch_of(python)
    assert before == (torch.__version__, torch.__file__)
    pip(python, "install", "--no-index", "--no-build-isolation", "--quiet", "-e", f"{REPO}[test]")
    assert torch_of(python) == before  # the same torch, from where it was

    out, data = tmp_path / "pretrain", tmp_path / "data"
    data.mkdir()
    spec = write_spec(out, make_prepared(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    job = subprocess.run([str(python), "-m", "stages.pretrain", "--spec", str(spec)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["final_step"] == TOTAL_STEPS


# --- what a cluster user sees in MLflow ------------------------------------------------------------

def test_a_stage_run_gets_mlflow_system_metrics_and_the_git_commit(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import code_version
    from stages.contract import StageSpec
    from stages.engine.tracking import MetricLogger

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x"), tags=code_version()).info.run_id
    logger = MetricLogger(StageSpec(name="s", kind="noop", config={}, output_dir=str(tmp_path),
                                    tracking_uri=uri, run_id=run_id))
    time.sleep(1.0)
    logger.close()
    run = client.get_run(run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} \
        <= set(run.data.metrics)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["git.dirty"] in ("true", "false")
