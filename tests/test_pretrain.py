"""The pretrain stage as a real job (`python -m stages.pretrain --spec ...`) on a tiny model and a
tiny prepared dataset: loss goes down, data order is exact, and SIGKILL / SIGTERM + rerun end with
bitwise the same parameters as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.configs.pretrain import LRConfig, PhaseConfig, PretrainConfig
from stages.configs.model import ModelConfig
from schedulers.fg_wsd import pretrain_schedule
from conftest import finish_job, sigkill_at_first_checkpoint_then_rerun, start_job, wait_for_checkpoint
from stages.contract import EXIT_PREEMPTED, StageSpec, read_json, save_spec

pytestmark = pytest.mark.slow

VOCAB = 300
SOURCES = {"web": (4, 150), "code": (150, 250), "math": (250, 300)}  # token id ranges per source
REPO = Path(__file__).resolve().parents[1]


def make_prepared(root: Path) -> Path:
    """A prepare-stage output: one .bin/.idx shard per source + manifest.json."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    shards = {}
    for source, (lo, hi) in SOURCES.items():
        prefix = root / source
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
        n_tokens = 0
        for _ in range(300):
            # a skewed, learnable distribution, EOD-terminated documents
            doc = lo + (rng.zipf(1.5, size=int(rng.integers(20, 120))) % (hi - lo))
            doc = np.append(doc, 2)
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
            n_tokens += len(doc)
        builder.finalize(str(prefix) + ".idx")
        shards[source] = {"prefix": str(prefix), "documents": 300, "tokens": n_tokens}
    (root / "manifest.json").write_text(json.dumps({"vocab_size": VOCAB, "eod_id": 2,
                                                    "shards": shards}))
    return root


MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                    num_query_groups=2, seq_length=32, rotary_base=10000.0,
                    hidden_dropout=0.1, attention_dropout=0.1)
# 128 tokens per step: 4 x seq 32 in the stable phases (6 + 5 + 5 steps), then 2 x seq 64 in the
# decay phase (8 steps, a per-phase global batch) = 24 steps
CONFIG = PretrainConfig(
    tokenizer="tok", data="data", global_batch_size=4, micro_batch_size=2, seed=7,
    lr=LRConfig(max=3e-3, min=3e-5, warmup_tokens=256, decay_tokens=1024, decay_style="cosine"),
    phases=[PhaseConfig("diverse", 768, {"web": 0.8, "code": 0.2}),
            PhaseConfig("mixed", 640, {"web": 0.5, "code": 0.3, "math": 0.2}),
            PhaseConfig("quality", 640, {"web": 0.2, "code": 0.4, "math": 0.4}),
            PhaseConfig("decay", 1024, {"code": 0.5, "math": 0.5}, seq_length=64,
                        rotary_base=100000.0, global_batch_size=2)],
    checkpoint_every=8, keep_checkpoints=2, eval_samples=8, log_every=5)
TOTAL_STEPS = 24


def write_spec(out: Path, data: Path) -> Path:
    spec = StageSpec(name="pretrain", kind="pretrain", config=asdict(CONFIG), output_dir=str(out),
                     inputs={"tokenizer": str(data), "data": str(data)}, model=asdict(MODEL))
    return save_spec(spec)








def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data_order.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    finish_job(start_job("stages.pretrain", write_spec(out, data)))
    return out


def test_schedule_of_the_tiny_config():
    schedule = pretrain_schedule(CONFIG, MODEL)
    assert schedule.total_steps == TOTAL_STEPS
    assert [p.steps for p in schedule.phases] == [6, 5, 5, 8]
    assert schedule.decay_steps == 8 and schedule.warmup_steps == 2


def test_uninterrupted_run(reference):
    manifest = read_json(reference / "manifest.json")
    assert manifest["final_step"] == TOTAL_STEPS
    assert manifest["tokens"] == 24 * 128
    assert set(manifest["eval_losses"]) == {"diverse", "mixed", "quality", "decay"}
    assert Path(manifest["checkpoint"]).name == f"step-{TOTAL_STEPS:06d}"
    assert read_json(reference / "exit.json")["status"] == "done"
    losses = [m["loss"] for m in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
              if "loss" in m]
    assert len(losses) == TOTAL_STEPS
    assert losses[-1] < losses[0]
    # keep-last-2 pruning during the run
    kept = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert kept == ["step-000016", "step-000024"]


def test_data_order_is_exact_per_phase(reference):
    recs = records(reference)
    assert [r["step"] for r in recs] == list(range(TOTAL_STEPS))
    per_phase = defaultdict(list)
    for r in recs:
        per_phase[r["phase"]].extend(r["samples"])
    schedule = pretrain_schedule(CONFIG, MODEL)
    for phase in schedule.phases:
        assert per_phase[phase.index] == list(range(phase.steps * phase.global_batch_size))
    # no two steps read the same batch
    assert len({r["tokens_sha256"] for r in recs}) == TOTAL_STEPS


def test_sigkill_then_rerun_is_bitwise_identical(reference, data, tmp_path):
    sigkill_at_first_checkpoint_then_rerun("stages.pretrain", write_spec(tmp_path, data))
    assert (read_json(tmp_path / "manifest.json")["params_sha256"]
            == read_json(reference / "manifest.json")["params_sha256"])
    assert records(tmp_path) == records(reference)
    assert (read_json(tmp_path / "manifest.json")["eval_losses"]
            == read_json(reference / "manifest.json")["eval_losses"])


def test_sigterm_checkpoints_exits_75_and_resumes(reference, data, tmp_path):
    spec = write_spec(tmp_path, data)
    proc = start_job("stages.pretrain", spec)
    wait_for_checkpoint(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as Slurm and torchrun do
    out = finish_job(proc, expect=EXIT_PREEMPTED)
    status = read_json(tmp_path / "exit.json")
    assert status["status"] == "preempted"
    step = int(status["detail"].rsplit(" ", 1)[-1])
    assert 0 < step < TOTAL_STEPS, out
    assert (tmp_path / "checkpoints" / f"step-{step:06d}" / "complete.json").exists()
    assert len(records(tmp_path)) == step
    finish_job(start_job("stages.pretrain", spec))
    assert (read_json(tmp_path / "manifest.json")["params_sha256"]
            == read_json(reference / "manifest.json")["params_sha256"])
    assert records(tmp_path) == records(reference)


def test_killed_torchrun_leaves_no_worker_and_the_rerun_trains_alone(reference, data, tmp_path):
    """SIGKILL torchrun's process group mid-training and rerun at once, as the launcher does.

    torchrun starts its worker in a session of its own, so the kill does not reach it; before the
    fix it trained on beside the rerun's worker in the same dir. Now it follows its torchrun
    within a moment, the rerun's worker takes the stage dir only once it has, and the end result
    is bitwise the uninterrupted run's."""
    import threading
    import time

    import psutil

    from launch.config import LaunchConfig
    from launch.local import run_job
    from stages.contract import load_spec
    from stages.engine.checkpoint import latest_checkpoint

    spec = load_spec(write_spec(tmp_path, data))
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = threading.Thread(target=run_job, args=(spec, LaunchConfig()), kwargs={"env": env})
    first.start()
    deadline = time.monotonic() + 180
    while latest_checkpoint(tmp_path / "checkpoints") is None:
        assert first.is_alive() and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.005)
    old = [psutil.Process(int(p.read_text())) for p in (tmp_path / "workers").glob("*.pid")]
    assert old and all(p.is_running() for p in old)
    os.killpg(int((tmp_path / "job.pid").read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    first.join()
    assert not (tmp_path / "manifest.json").exists(), "finished before it was killed"

    overlaps, old_gone_after, stop = [], [], threading.Event()

    def watch() -> None:  # who holds the stage dir while any worker of the first attempt lives
        while not stop.is_set():
            alive = [p.pid for p in old if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive and not old_gone_after:
                old_gone_after.append(time.monotonic() - killed_at)
            holder = (tmp_path / "job.lock").read_text()
            if alive and holder and not any(f"pid {pid} " in holder for pid in alive):
                overlaps.append((alive, holder))  # a new worker trains while an old one lives
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_job(spec, LaunchConfig(), env=env)
    finally:
        stop.set()
        watcher.join()
    assert result.status == "done", result.error
    assert not overlaps, overlaps
    assert old_gone_after and old_gone_after[0] < 10, old_gone_after
    assert "resumed from" in (tmp_path / "job.log").read_text()
    assert (read_json(tmp_path / "manifest.json")["params_sha256"]
            == read_json(reference / "manifest.json")["params_sha256"])


def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_one_before_resumed(reference, data,
                                                                            tmp_path):
    from stages.engine.checkpoint import complete_checkpoints

    spec = write_spec(tmp_path, data)
    proc = start_job("stages.pretrain", spec)
    deadline = time.monotonic() + 180
    while len(complete_checkpoints(tmp_path / "checkpoints")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no two checkpoints"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before, latest = complete_checkpoints(tmp_path / "checkpoints")[-2:]
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob = bytearray(biggest.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit
    biggest.write_bytes(bytes(blob))

    out = finish_job(start_job("stages.pretrain", spec))
    assert f"WARNING: checkpoint {latest} is corrupt" in out
    assert f"resumed from {before}" in out
    assert (tmp_path / "checkpoints" / f"corrupt-{latest.name}").is_dir()
    assert (read_json(tmp_path / "manifest.json")["params_sha256"]
            == read_json(reference / "manifest.json")["params_sha256"])


def _disk_bytes(path: Path) -> int:
    """Bytes a tree takes on a filesystem (whole blocks, as tmpfs counts them)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_a_full_disk_mid_checkpoint_stops_clearly_and_a_rerun_resumes(reference, data, tmp_path):
    """A real size-capped tmpfs holds the stage dir: room for everything else the run writes and
    one and a half checkpoints. With keep_checkpoints 1 the second save still needs the first
    beside it until it is complete, so it runs out of space."""
    import dataclasses
    import shutil
    import subprocess

    from stages.engine.checkpoint import complete_checkpoints

    ckpt = _disk_bytes(complete_checkpoints(reference / "checkpoints")[-1])
    rest = _disk_bytes(reference) - sum(_disk_bytes(p) for p in complete_checkpoints(
        reference / "checkpoints"))
    disk = tmp_path / "disk"
    disk.mkdir()
    size = rest + int(1.5 * ckpt) + (256 << 10)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                            str(disk)]).returncode != 0:
        pytest.skip("no size-capped tmpfs can be mounted here (needs root)")
    try:
        out_dir = disk / "pretrain"
        spec = save_spec(StageSpec(name="pretrain", kind="pretrain", output_dir=str(out_dir),
                                   config=asdict(dataclasses.replace(CONFIG, keep_checkpoints=1)),
                                   inputs={"tokenizer": str(data), "data": str(data)},
                                   model=asdict(MODEL)))
        out = finish_job(start_job("stages.pretrain", spec), expect=1)
        assert "no space left for checkpoint step-" in out and f"in {out_dir / 'checkpoints'}" in out
        assert "MiB free, it needs about" in out
        left = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
        assert len(left) == 1 and not left[0].endswith(".tmp"), left  # only the complete one
        assert read_json(out_dir / "exit.json")["status"] == "failed"
        subprocess.run(["mount", "-o", f"remount,size={20 * size}", str(disk)], check=True)
        out = finish_job(start_job("stages.pretrain", spec))
        assert f"resumed from {out_dir / 'checkpoints' / left[0]}" in out
        assert (read_json(out_dir / "manifest.json")["params_sha256"]
                == read_json(reference / "manifest.json")["params_sha256"])
    finally:
        subprocess.run(["umount", "-l", str(disk)])
        shutil.rmtree(disk, ignore_errors=True)


def test_pretrain_from_an_init_stage_trains_the_architecture_its_manifest_records(
        data, tmp_path, megatron_world):
    """Continued pretraining of a postnas hybrid (or an imported model): the architecture is the
    one the init stage's manifest records (here 3 layers, the middle one linear attention), not
    the recipe's 2-layer model, and training starts from its weights."""
    from stages.configs.model import num_params
    from stages.engine import checkpoint as ckpt
    from stages.engine.hf.importer import save_weights
    from stages.engine.model import build_model

    hybrid = ModelConfig(**{**asdict(MODEL), "num_layers": 3, "layout": ["full", "linear", "full"]})
    init = tmp_path / "hybrid"
    torch.manual_seed(1)
    model = build_model(hybrid, VOCAB, hybrid.seq_length)
    save_weights(model, init / "checkpoints")
    (init / "manifest.json").write_text(json.dumps({"model": asdict(hybrid)}))
    out = tmp_path / "continued"
    spec = StageSpec(name="pretrain", kind="pretrain", config=asdict(CONFIG), output_dir=str(out),
                     inputs={"tokenizer": str(data), "data": str(data), "init": str(init)},
                     model=asdict(MODEL))
    log = finish_job(start_job("stages.pretrain", save_spec(spec)))
    manifest = read_json(out / "manifest.json")
    assert manifest["model"]["layout"] == hybrid.layout and manifest["final_step"] == TOTAL_STEPS
    assert manifest["num_params"] == num_params(hybrid, VOCAB) != num_params(MODEL, VOCAB)
    # it trained the init's weights: the loaded hybrid is not where the run ended, and the run's
    # checkpoint loads into the hybrid's shape
    trained = build_model(hybrid, VOCAB, hybrid.seq_length)
    ckpt.load_model_weights_only(str(out), trained)
    assert ckpt.params_sha256(trained) == manifest["params_sha256"] != ckpt.params_sha256(model)
    assert f"initialised from {init} (weights only)" in log
