"""Tokenizer training, Ray tokenization into Megatron shards, and the tokenizer/prepare stages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_recipes.sources import iter_documents
from data_recipes.indexed_shards import tokenize_source_to_indexed
from data_recipes.tokenizer_loading import load_processor
from data_recipes.tokenizer_training import train_sentencepiece
from stages import prepare, tokenizer
from stages.contract import (EXIT_STATUS, MANIFEST, StageSpec, read_json, save_spec, sha256_file,
                             write_manifest)

UNUSUAL = "naïve café — 日本語 ½ 🦙𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\ttab\r\n  indented\n\n\x00end "


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    odd = [UNUSUAL, "x", "  leading and trailing spaces  ", "line\n" * 50, "mixed 123 + 4 = 127"]
    (d / "odd.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in odd))
    return {
        "docs": {"kind": "stdlib", "part": "docstrings", "max_docs": 120, "quality": "high"},
        "math": {"kind": "arithmetic", "num_docs": 400, "seed": 1, "max_digits": 5},
        "odd": {"kind": "jsonl", "paths": [str(d / "odd.jsonl")]},
    }


@pytest.fixture(scope="module")
def tokenizer_stage(tmp_path_factory, sources):
    """The tokenizer stage run once for the module, its manifest written as job.main would."""
    out = tmp_path_factory.mktemp("work") / "tok-00000000"
    spec = StageSpec(name="tok", kind="tokenizer", output_dir=str(out), sources=sources,
                     config={"kind": "tokenizer", "sources": ["docs", "math"], "vocab_size": 800,
                             "sample_bytes": 400_000, "seed": 0})
    produced = tokenizer.run(spec)
    write_manifest(spec, produced)
    return spec, produced


def shard_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_train_sentencepiece_roundtrip_and_determinism(tmp_path, sources):
    def texts():
        return [iter_documents(sources["docs"]), iter_documents(sources["math"])]

    model = train_sentencepiece(texts(), tmp_path / "a", vocab_size=600, seed=0,
                                sample_bytes=200_000)
    sp = load_processor(model)
    assert sp.get_piece_size() == 600
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    # byte fallback: nothing is <unk>, and decode(encode(x)) is x, whitespace and all
    ids = sp.encode(UNUSUAL)
    assert sp.unk_id() not in ids and sp.decode(ids) == UNUSUAL
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)
    for doc in list(iter_documents(sources["docs"]))[:30]:
        assert sp.decode(sp.encode(doc)) == doc
    # same text, same settings -> byte-identical model (temp paths and thread count are dropped)
    again = train_sentencepiece(texts(), tmp_path / "b", vocab_size=600, seed=0,
                                sample_bytes=200_000)
    assert Path(model).read_bytes() == Path(again).read_bytes()
    assert not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob("*sample*"))


def test_vocab_size_errors_are_one_friendly_line(tmp_path):
    texts = [iter(["just a little text, not much at all"] * 20)]
    with pytest.raises(ValueError, match=r"vocab_size 5000 is too large .* use vocab_size <= \d+"):
        train_sentencepiece(texts, tmp_path / "big", vocab_size=5000, sample_bytes=10_000)
    texts = [iter([UNUSUAL * 3])]
    with pytest.raises(ValueError, match=r"vocab_size 100 is too small.*at least \d+"):
        train_sentencepiece(texts, tmp_path / "small", vocab_size=100, sample_bytes=10_000)


def test_tokenizer_stage_manifest(tokenizer_stage):
    spec, produced = tokenizer_stage
    model = Path(produced["model_file"])
    assert model.is_absolute() and model == spec.out.resolve() / "tokenizer.model"
    assert (spec.out / "tokenizer.vocab").read_text().count("\n") == 800
    assert produced["vocab_size"] == 800
    assert (produced["unk_id"], produced["bos_id"], produced["eod_id"], produced["pad_id"]) == \
        (0, 1, 2, 3)
    assert 0 < produced["sample_bytes"] <= 400_000
    assert produced["sha256"] == sha256_file(model)
    assert not (spec.out / "sample.txt").exists()


def test_tokenizer_stage_adopts_model_file(tmp_path, tokenizer_stage):
    _, trained = tokenizer_stage
    spec = StageSpec(name="tok2", kind="tokenizer", output_dir=str(tmp_path / "tok2"),
                     config={"kind": "tokenizer", "model_file": trained["model_file"]})
    produced = tokenizer.run(spec)
    assert produced["sha256"] == trained["sha256"] and produced["sample_bytes"] is None
    assert produced["model_file"] == str((tmp_path / "tok2" / "tokenizer.model").resolve())
    assert (tmp_path / "tok2" / "tokenizer.vocab").read_text().count("\n") == 800


# --------------------------------------------------------------------------------------------
# Shards


def test_tokenize_to_indexed_roundtrip(ray_local, tmp_path, tokenizer_stage, sources):
    model = tokenizer_stage[1]["model_file"]
    docs = list(iter_documents(sources["docs"])) + list(iter_documents(sources["odd"]))
    seen = []
    counts = tokenize_source_to_indexed(iter(docs), model, tmp_path / "s", docs_per_task=7,
                                        progress=lambda d, t: seen.append((d, t)))
    ds = shard_docs(tmp_path / "s")
    sp = load_processor(model)
    assert counts["documents"] == len(ds) == len(docs)
    assert counts["tokens"] == int(ds.sequence_lengths.sum()) == seen[-1][1]
    assert ds.index.dtype == np.uint16
    assert list(ds.document_indices) == list(range(len(docs) + 1))  # one sequence per document
    for i, doc in enumerate(docs):  # original order, EOD after each, exact text back
        tokens = ds[i]
        assert tokens[-1] == sp.eos_id() and sp.eos_id() not in tokens[:-1]
        assert sp.decode(tokens[:-1].tolist()) == doc
    assert [d for d, _ in seen] == sorted({d for d, _ in seen}) and seen[-1][0] == len(docs)
    assert not list(tmp_path.glob("*partial*"))


def test_interrupted_tokenization_leaves_no_shard(ray_local, tmp_path, tokenizer_stage, sources):
    def stop(docs, tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_source_to_indexed(iter_documents(sources["math"]), tokenizer_stage[1]["model_file"],
                                   tmp_path / "s", docs_per_task=50, progress=stop)
    assert list(tmp_path.iterdir()) == []


def prepare_spec(out, tok_spec, sources, names=("docs", "math", "odd")):
    return StageSpec(name="prep", kind="prepare", output_dir=str(out), sources=sources,
                     inputs={"tokenizer": tok_spec.output_dir},
                     config={"kind": "prepare", "tokenizer": "tok", "sources": list(names),
                             "docs_per_task": 32})


def test_prepare_stage_shards_and_resume(ray_local, tmp_path, tokenizer_stage, sources, capsys):
    tok_spec, tok = tokenizer_stage
    spec = prepare_spec(tmp_path / "prep", tok_spec, sources)
    result = prepare.run(spec)
    assert result["tokenizer"] == tok["model_file"] and result["eod_id"] == 2
    assert result["vocab_size"] == 800 and set(result["shards"]) == {"docs", "math", "odd"}
    sp = load_processor(tok["model_file"])
    for name, shard in result["shards"].items():
        docs = list(iter_documents(sources[name]))
        ds = shard_docs(shard["prefix"])
        assert shard["prefix"] == str((tmp_path / "prep" / "shards" / name).resolve())
        assert shard["documents"] == len(ds) == len(docs)
        assert shard["tokens"] == int(ds.sequence_lengths.sum())
        assert shard["bin_sha256"] == sha256_file(shard["prefix"] + ".bin")
        assert shard["idx_sha256"] == sha256_file(shard["prefix"] + ".idx")
        assert shard["quality"] == sources[name].get("quality", "general")
        for i in (0, len(docs) // 2, len(docs) - 1):
            assert sp.decode(ds[i][:-1].tolist()) == docs[i]

    # rerun: every completed source is skipped, its files untouched
    shards = tmp_path / "prep" / "shards"
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    capsys.readouterr()
    assert prepare.run(spec) == result
    assert capsys.readouterr().out.count("skipping") == 3
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == mtimes

    # a source whose shard was lost (or never finished) is rebuilt, the others are kept
    (shards / "math.bin").unlink()
    assert prepare.run(spec) == result
    assert (shards / "docs.bin").stat().st_mtime_ns == mtimes["docs.bin"]
    assert (shards / "math.bin").stat().st_mtime_ns != mtimes["math.bin"]


@pytest.mark.slow
def test_prepare_as_a_job_subprocess(ray_local, tmp_path, tokenizer_stage, sources):
    tok_spec, _ = tokenizer_stage
    spec = prepare_spec(tmp_path / "prep", tok_spec, sources, names=("math",))
    path = save_spec(spec)
    # the job joins the test's Ray cluster instead of starting its own (faster; the cluster path)
    env = {**os.environ, "PIPELINE_RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--spec", str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(spec.out / EXIT_STATUS)["status"] == "done"
    manifest = read_json(spec.out / MANIFEST)
    assert manifest["kind"] == "prepare" and manifest["shards"]["math"]["documents"] == 400
    assert "math: " in proc.stdout


@pytest.mark.slow
def test_ray_workers_get_the_malloc_cap_from_the_cluster_not_per_task():
    """A local cluster started for Ray work passes WORKER_ENV (the malloc arena cap) to every
    worker itself, so tasks need no runtime_env (which kept them off idle workers)."""
    code = ("import os\nfrom data_recipes.ray_tasks import as_finished\n"
            "print(list(as_finished(lambda: os.environ.get('MALLOC_ARENA_MAX'), [(), ()])))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_ARENA_MAX", "PIPELINE_RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['2', '2']"
