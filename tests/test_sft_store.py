"""The SFT store: batch encoding equals encode_chat, shards round-trip, the sft_tokenize stage
(malformed records under an error budget, resume per shard), and SFT packing from the store."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from conftest import finish_job, start_job
from data_recipes.chat import Message, encode_chat
from data_recipes.conversations import ConversationsConfig, parse_payload, to_messages
from data_recipes.sft_pack import build_sequence, pack, plan_packing
from data_recipes.sft_store import SFTStore, encode_conversations, write_shard
from stages.configs.data import SFTTokenizeConfig
from stages.contract import StageSpec, read_json, save_spec, sha256_file
from test_sft import tok  # noqa: F401  (the chat tokenizer fixture SFT's tests train)


def conversations(n: int, seed: int = 0) -> list[list[Message]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conv = [Message("system", "Show your work.")] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            conv += [Message("user", f"What is {a} + {b}?"),
                     Message("assistant", f"Answer: {a + b}",
                             f"{a} plus {b}\nis {a + b}" if rng.random() < 0.5 else "")]
        out.append(conv)
    return out


@pytest.mark.parametrize("thinking", ["on", "off"])
def test_batch_encoding_equals_encode_chat(tok, thinking):
    convs = conversations(60)
    tokens, mask, lengths = encode_conversations(tok, convs, thinking)
    at = 0
    for conv, n in zip(convs, lengths):
        ids, m = encode_chat(tok, conv, thinking)
        assert tokens[at:at + n].tolist() == ids and mask[at:at + n].tolist() == m
        at += n
    assert at == len(tokens)


def test_store_round_trips_and_reads_lengths_from_the_index(tok, tmp_path):
    convs = conversations(50, seed=1)
    first = write_shard(tmp_path / "a-00000", tok, convs[:20], batch=7)
    write_shard(tmp_path / "a-00001", tok, convs[20:], batch=64)
    assert first["conversations"] == 20 and not list(tmp_path.glob("*.partial*"))
    store = SFTStore([str(tmp_path / "a-00000"), str(tmp_path / "a-00001")])
    assert len(store) == 50
    for i, conv in enumerate(convs):
        ids, mask = encode_chat(tok, conv)
        got_ids, got_mask = store[i]
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
        assert store.lengths[i] == len(ids)
    assert store[0][0].dtype == np.uint16 and store[0][1].dtype == np.uint8


def test_sft_sequences_from_the_store_equal_those_from_encoded_lists(tok, tmp_path):
    convs = conversations(40, seed=2)
    write_shard(tmp_path / "s", tok, convs)
    store = SFTStore([str(tmp_path / "s")])
    encoded = [encode_chat(tok, c) for c in convs]
    want = pack([len(e[0]) for e in encoded], 96, epochs=2, seed=5)
    plan = plan_packing(store.lengths, 96, epochs=2, seed=5)  # lengths alone, from the .idx
    assert [(p.samples, p.epoch) for p in plan] == [(p.samples, p.epoch) for p in want]
    for p in plan.slice(0, len(plan)):
        a, b = build_sequence(store, p, 96, tok.pad_id), build_sequence(encoded, p, 96, tok.pad_id)
        assert all(np.array_equal(a[k], b[k]) for k in a)


# --- the sft_tokenize stage --------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                     {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\nAnswer: 4"}]}


def write_datasets(root: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = []
    for i in range(30):
        rec = json.loads(json.dumps(GOOD))
        rec["messages"][0]["content"] = f"What is {i} + {i}?"
        rec["messages"][1]["content"] = f"Answer: {2 * i}"
        lines.append(json.dumps(rec))
    lines[6] = '{"messages": [{"role": "user"'                            # line 7: cut short
    lines[19] = json.dumps({"messages": [{"role": "user", "content": "q"}]})  # line 20
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"instruction": [f"Double {i}" for i in range(12)],
                             "output": [f"{2 * i}" for i in range(12)]}), root / "alpaca.parquet")
    return {"chat": root / "chat.jsonl", "alpaca": root / "alpaca.parquet"}


def tokenize_spec(out: Path, tok, files: dict[str, Path], max_errors: float = 0.1) -> Path:
    (out.parent / "tokdir").mkdir(exist_ok=True)
    (out.parent / "tokdir" / "manifest.json").write_text(json.dumps({"model_file": tok.model_file}))
    cfg = SFTTokenizeConfig(tokenizer="tok", records_per_shard=8, records_per_task=3, datasets=[
        ConversationsConfig(name="chat", source={"kind": "jsonl", "paths": [str(files["chat"])]},
                            format="messages", max_errors=max_errors),
        ConversationsConfig(name="alpaca", source={"kind": "parquet",
                                                   "paths": [str(files["alpaca"])]})])
    return save_spec(StageSpec(name="chat_sets", kind="sft_tokenize", config=asdict(cfg),
                               output_dir=str(out), inputs={"tokenizer": str(out.parent / "tokdir")}))


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tokenize")
    files = write_datasets(root)
    out = root / "out"
    spec = tokenize_spec(out, tok, files)
    log = finish_job(start_job("stages.sft_tokenize", spec), timeout=180)
    return out, files, spec, log


@pytest.mark.slow
def test_tokenize_stage_stores_every_good_record_and_names_the_bad_ones(tokenized, tok):
    out, files, _, log = tokenized
    m = read_json(out / "manifest.json")
    chat, alpaca = m["sft_store"]["datasets"]
    assert (chat["records"], chat["conversations"], chat["malformed"]) == (30, 28, 2)
    assert (alpaca["records"], alpaca["conversations"], alpaca["malformed"]) == (12, 12, 0)
    assert len(chat["shards"]) == 4 and len(alpaca["shards"]) == 2  # 8 records per shard
    assert (out / "store" / "chat.errors.txt").read_text().splitlines() == [
        f"{files['chat']}:7: not valid JSON (Expecting ',' delimiter at column 30)",
        f"{files['chat']}:20: no assistant turn (nothing to train on)"]
    assert f"chat: skipped {files['chat']}:7: not valid JSON" in log
    records = [to_messages(parse_payload(line), "messages", {})
               for i, line in enumerate(files["chat"].read_text().splitlines()) if i not in (6, 19)]
    assert chat["shards"][0] == "store/chat-00000"  # relative to the stage dir
    store = SFTStore([str(out / p) for p in chat["shards"]])
    assert len(store) == 28
    for i, conv in enumerate(records):
        ids, mask = encode_chat(tok, conv)
        assert store[i][0].tolist() == ids and store[i][1].tolist() == mask
    assert records[0][1] == Message("assistant", "Answer: 0")
    assert m["sft_store"]["tokenizer_sha256"] == sha256_file(tok.model_file)
    alpaca_store = SFTStore([str(out / p) for p in alpaca["shards"]])
    assert alpaca_store[11][0].tolist() == encode_chat(
        tok, [Message("user", "Double 11"), Message("assistant", "22")])[0]


@pytest.mark.slow
def test_tokenize_stage_resumes_per_shard(tokenized):
    out, _, spec, _ = tokenized
    shards = [str(out / p)
              for p in read_json(out / "manifest.json")["sft_store"]["datasets"][0]["shards"]]
    before = {p: sha256_file(p + ".bin") for p in shards}
    mtimes = {p: Path(p + ".bin").stat().st_mtime_ns for p in shards}
    # as a kill inside shard 2 leaves it: no done-record, a partial file, no manifest
    Path(shards[2] + ".done.json").unlink()
    Path(shards[2] + ".bin").rename(shards[2] + ".partial.bin")
    (out / "manifest.json").unlink()
    log = finish_job(start_job("stages.sft_tokenize", spec), timeout=180)
    assert log.count("done earlier") == 5  # 3 of chat's shards, both of alpaca's
    assert {p: sha256_file(p + ".bin") for p in shards} == before
    assert [p for p in shards if Path(p + ".bin").stat().st_mtime_ns != mtimes[p]] == [shards[2]]
    assert read_json(out / "manifest.json")["sft_store"]["datasets"][0]["conversations"] == 28


@pytest.mark.slow
def test_past_the_error_budget_the_stage_fails_in_one_line(tmp_path, tok):
    files = write_datasets(tmp_path)
    spec = tokenize_spec(tmp_path / "out", tok, files, max_errors=0.05)
    log = finish_job(start_job("stages.sft_tokenize", spec), expect=1, timeout=180)
    assert ("datasets[0].max_errors: chat: 2 of 30 records are malformed (6.67%), over the budget "
            f"of 5.00%; first: {files['chat']}:7: not valid JSON") in log
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_sft_trains_on_a_tokenize_stage_and_sft_data_mixed_by_weight(tokenized, tok, tmp_path):
    from stages.configs.base import PostTrainingLRConfig
    from stages.configs.model import ModelConfig
    from stages.configs.post_training import SFTConfig

    out, _, _, _ = tokenized
    refined = tmp_path / "refined"  # an sft_data stage that wrote no store: sft encodes it itself
    refined.mkdir()
    with open(refined / "data.jsonl", "w") as f:
        for i, conv in enumerate(conversations(10, seed=3)):
            f.write(json.dumps({"id": str(i), "messages": [asdict(m) for m in conv]}) + "\n")
    (refined / "manifest.json").write_text(json.dumps({"stage": "refined",
                                                       "data": str(refined / "data.jsonl")}))
    cfg = SFTConfig(tokenizer="tok", data="chat_sets", more_data="refined", epochs=1,
                    mix={"chat": 0.5, "alpaca": 2.0}, global_batch_size=2, micro_batch_size=2,
                    lr=PostTrainingLRConfig(max=1e-3, min=1e-5), heldout_samples=0,
                    checkpoint_every=100, log_every=5)
    model = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                        num_query_groups=2, seq_length=128)
    spec = save_spec(StageSpec(name="sft", kind="sft", config=asdict(cfg),
                               output_dir=str(tmp_path / "sft"), model=asdict(model),
                               inputs={"tokenizer": str(out.parent / "tokdir"), "data": str(out),
                                       "more_data": str(refined)}))
    log = finish_job(start_job("stages.sft", spec), timeout=300)
    m = read_json(tmp_path / "sft" / "manifest.json")
    assert m["samples"] == 14 + 12 + 10  # half of chat's 28, all of alpaca's and refined's
    assert "36 samples in 3 dataset(s)" in log and "48 per epoch after the mix" in log
    assert (tmp_path / "sft" / "store" / "refined.done.json").exists()
    assert m["final_step"] == m["sequences"] // 2 and np.isfinite(m["final_loss"])


def test_sft_data_writes_its_samples_into_the_store(tok, tmp_path):
    from stages.sft_data import _sft_store

    convs = conversations(5, seed=4)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "messages": [asdict(m) for m in c]}) + "\n"
                            for i, c in enumerate(convs)))
    (tmp_path / "tokdir").mkdir()
    (tmp_path / "tokdir" / "manifest.json").write_text(json.dumps({"model_file": tok.model_file}))
    spec = StageSpec(name="sft_data", kind="sft_data", config={}, output_dir=str(tmp_path),
                     inputs={"tokenizer": str(tmp_path / "tokdir")})
    store = _sft_store(spec, data)["sft_store"]
    assert store["tokenizer_sha256"] == sha256_file(tok.model_file)
    (entry,) = store["datasets"]
    assert entry["name"] == "sft_data" and entry["shards"] == ["store/sft_data"]
    read = SFTStore([str(tmp_path / "store" / "sft_data")])
    assert [read[i][0].tolist() for i in range(5)] == [encode_chat(tok, c)[0] for c in convs]
    assert _sft_store(StageSpec(name="x", kind="sft_data", config={}, output_dir=str(tmp_path)),
                      data) == {}  # no tokenizer: sft encodes data.jsonl itself
