"""The pretrain stage as a real job (`python -m stages.pretrain --spec ...`) on a tiny model and a
tiny prepared dataset: loss goes down, data order is exact, and SIGKILL / SIGTERM + rerun end with
bitwise the same parameters as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
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
