"""A distillation teacher behind an OpenAI-compatible server (vLLM's API shapes), served here by
the test server (stages.serve.CheckpointBackend) from a pipeline checkpoint.

- The driver refuses, before anything starts (exit 2, one line naming the recipe key), a server
  that is unreachable, does not serve the model, or tokenizes differently from the student.
- The job makes the same check before any work.
- Distillation through HTTP equals distillation with the same teacher held in the job, on the
  same top-k support: the cached top-k, every step's losses and the trained parameters.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.serve import ChatServer, CheckpointBackend
from conftest import finish_job, start_job
from data_recipes.openai_client import PROBE_TEXT, TeacherServer, TeacherServerConfig
from data_recipes.prompts import PromptsConfig
from pipeline.cli import main
from pipeline.recipe import RecipeError
from pipeline.validate import load_recipe
from stages.configs.post_training import DistillConfig, DistillLossConfig
from stages.contract import read_json
from test_distill import DISTILL, STUDENT, TEACHER, distill_spec, save_stage, train_tok
from test_distill import inputs, tok  # noqa: F401  (fixtures: a tokenizer, random checkpoints)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
K = 8


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed again when this returns


def http_teacher(url: str, model: str = "teacher") -> str:
    return f"stages.distill.teacher={{kind: http, url: '{url}', model: {model}, top_k: {K}}}"


# --- the config and the driver's probe ---------------------------------------------------------

def test_the_teacher_is_a_stage_name_or_a_server_and_only_a_stage_is_an_edge():
    cfg = dataclasses.replace(DISTILL, teacher={"kind": "http", "url": "http://h:8000/v1",
                                                "model": "m", "top_k": K})
    assert cfg.teacher == TeacherServerConfig(url="http://h:8000/v1", model="m", top_k=K)
    for bad, why in (({"kind": "vllm"}, "teacher.kind: 'vllm'"),
                     ({"kind": "http", "url": "h:8000", "model": "m"}, "teacher.url: 'h:8000'"),
                     ({"kind": "http", "url": "http://h/v1", "model": "m", "k": 2},
                      "teacher.k: unknown key"),
                     (["teacher"], "teacher: ['teacher']; a stage name or")):
        with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("(", r"\(")):
            dataclasses.replace(DISTILL, teacher=bad)
    with pytest.raises(ValueError, match="loss.teacher_topk: 4; with an http teacher"):
        dataclasses.replace(cfg, loss=DistillLossConfig(teacher_topk=4))
    recipe = load_recipe(TINY, ["workdir=/tmp/unused", http_teacher("http://h:8000/v1")],
                         probe_servers=False)
    from pipeline.graph import build_graph, make_spec

    graph = build_graph(recipe)
    node = graph["distill"]
    assert "teacher" not in node.refs and "teacher_sft" not in node.deps
    assert "teacher" not in make_spec(node, graph).inputs
    other = build_graph(load_recipe(TINY, ["workdir=/tmp/unused", http_teacher(
        "http://h:8000/v1", "other")], probe_servers=False))
    assert other["distill"].hash != node.hash  # the served model is part of the content


def test_an_unreachable_teacher_server_is_one_line_exit_2_and_nothing_starts(tmp_path, capsys):
    workdir = tmp_path / "wd"
    code = main(["run", str(TINY), f"workdir={workdir}", http_teacher(closed_port_url())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: stages.distill.teacher.url: the teacher server is not "
                             "usable: http://127.0.0.1:")
    assert "unreachable" in err[0]
    assert not workdir.exists()
    # `run --until`/`--only` asks only the servers of the stages it will run
    from pipeline.validate import probe_teacher_servers

    recipe = load_recipe(TINY, [f"workdir={workdir}", http_teacher(closed_port_url())])
    assert probe_teacher_servers(recipe, {"tokenizer", "sft"}) == []
    assert [k for k, _ in probe_teacher_servers(recipe, {"distill"})] == [
        "stages.distill.teacher.url"]


def test_the_driver_probes_the_served_model_and_its_tokenizer(tok, tmp_path):
    adopt = [f"workdir={tmp_path / 'wd'}", f"stages.tokenizer.model_file={tok.model_file}"]
    other = train_tok(tmp_path, "other", 400, seed=7)  # same size, other merges
    with ChatServer(checkpoint=CheckpointBackend(None, other, "teacher")) as server:
        with pytest.raises(RecipeError) as e:
            load_recipe(TINY, adopt + [http_teacher(server.url, "qwen")], probe_servers=True)
        assert dict(e.value.problems)["stages.distill.teacher.model"] == (
            f"{server.url} does not serve 'qwen' (it serves 'teacher')")
        with pytest.raises(RecipeError) as e:
            load_recipe(TINY, adopt + [http_teacher(server.url)], probe_servers=True)
        (key, msg), = e.value.problems
        assert key == "stages.distill.teacher"
        assert msg.startswith("the server's tokenizer is not the student's: the probe text is ")
        assert "first difference at token" in msg and "\n" not in msg
    with ChatServer(checkpoint=CheckpointBackend(None, tok, "teacher")) as server:
        load_recipe(TINY, adopt + [http_teacher(server.url)], probe_servers=True)  # accepted
        assert [r[0] for r in server.requests] == ["/tokenize"]
    # the probe text covers the chat markers as single tokens
    assert all(marker in PROBE_TEXT for marker in ("<|im_start|>", "<|im_end|>", "<think>"))


# --- the stage ---------------------------------------------------------------------------------

# A served teacher takes a whole training row plus the token a completion generates: a longer
# context than the student's, as real teachers have.
LONG_TEACHER = dataclasses.replace(TEACHER, seq_length=2 * TEACHER.seq_length)


@pytest.fixture(scope="module")
def long_inputs(inputs, tok, tmp_path_factory) -> dict[str, str]:  # noqa: F811
    root = tmp_path_factory.mktemp("long_teacher")
    return {**inputs, "teacher": save_stage(root, "teacher", LONG_TEACHER, tok.vocab_size, 2)}


@pytest.fixture(scope="module")
def teacher_server(long_inputs, tok):  # noqa: F811
    from stages.engine.generate import load_checkpoint_model

    model = load_checkpoint_model(long_inputs["teacher"], LONG_TEACHER, tok.vocab_size)
    with ChatServer(checkpoint=CheckpointBackend(model, tok, "teacher",
                                                 max_model_len=LONG_TEACHER.seq_length)) as server:
        yield server


SMALL = dataclasses.replace(DISTILL, prompts=PromptsConfig(num=12, seed=3, max_digits=1),
                            epochs=2, heldout_pairs=4, checkpoint_every=100)


def served(url: str) -> DistillConfig:
    return dataclasses.replace(SMALL, teacher={"kind": "http", "url": url, "model": "teacher",
                                               "top_k": K})


def test_the_server_answers_in_vllm_shapes(teacher_server, tok):  # noqa: F811
    server = TeacherServer(TeacherServerConfig(url=teacher_server.url, model="teacher", top_k=K))
    assert server.problem(tok, min_model_len=LONG_TEACHER.seq_length) is None
    assert server.problem(tok, min_model_len=LONG_TEACHER.seq_length + 1)[1].startswith(
        "the server's max_model_len 256 is below the 257 tokens")
    ids = tok.encode("What is 3 + 4? Answer: 7")
    values, indices = server.prompt_topk(ids, K)
    assert len(values) == len(ids) - 1 and all(len(v) == K for v in values)
    assert all(v == sorted(v, reverse=True) for v in values)
    logsumexp = torch.logsumexp(torch.tensor(values), -1)
    assert (logsumexp <= 1e-6).all()  # log-probs: the top k hold at most all the mass


@pytest.mark.slow
def test_a_server_with_another_tokenizer_fails_the_job_before_any_work(
        inputs, tmp_path):  # noqa: F811
    other = train_tok(tmp_path, "other", 380)
    with ChatServer(checkpoint=CheckpointBackend(None, other, "teacher")) as server:
        out = tmp_path / "run"
        spec = distill_spec(out, {k: v for k, v in inputs.items() if k != "teacher"},
                            served(server.url))
        log = finish_job(start_job("stages.distill", spec), expect=1)
    assert "teacher: the server's tokenizer is not the student's: the probe text is " in log
    assert not (out / "records").exists() and not (out / "checkpoints").exists()


def step_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss/dpo" in r]


@pytest.mark.slow
def test_http_distillation_equals_the_in_job_teacher_on_the_same_top_k(teacher_server, long_inputs,
                                                                       tok, tmp_path):  # noqa: F811
    from stages.engine.generate import load_checkpoint_model

    http, job = tmp_path / "http", tmp_path / "job"
    teacher_server.requests.clear()
    student_inputs = {k: v for k, v in long_inputs.items() if k != "teacher"}
    log = finish_job(start_job("stages.distill", distill_spec(http, student_inputs,
                                                              served(teacher_server.url))))
    m = read_json(http / "manifest.json")
    assert m["teacher_model"] == {"kind": "http", "url": teacher_server.url, "model": "teacher",
                                  "top_k": K}
    pairs = [json.loads(line) for line in (http / "pairs.jsonl").read_text().splitlines()]
    chats = [r for r in teacher_server.requests if r[0] == "chat"]
    assert {c[1] for c in chats} == {p["prompt"] for p in pairs}  # positives sampled there
    scored = [r for r in teacher_server.requests if r[0] == "/v1/completions"]
    assert len(scored) == 2 * 12  # one prompt_logprobs request per row (12 kept pairs)

    # the same pairs, the same teacher held in the job with its top-k cached on disk
    job.mkdir()
    shutil.copy(http / "pairs.jsonl", job / "pairs.jsonl")
    in_job = dataclasses.replace(SMALL, loss=dataclasses.replace(SMALL.loss, teacher_topk=K))
    finish_job(start_job("stages.distill", distill_spec(job, long_inputs, in_job)))

    # the cached top-k: the same token ids, the same distribution on them (the server sends
    # log-probs, the job keeps logits: equal up to a constant per position)
    ix = {d: np.load(d / "teacher_topk_indices.npy") for d in (http, job)}
    val = {d: torch.log_softmax(torch.from_numpy(np.load(d / "teacher_topk_values.npy")), -1)
           for d in (http, job)}
    used = torch.from_numpy(np.load(http / "teacher_topk_values.npy")).abs().sum(-1) > 0
    assert used.sum() > 100
    assert (ix[http][used.numpy()] == ix[job][used.numpy()]).all()
    topk_diff = float((val[http] - val[job])[used].abs().max())
    assert topk_diff < 1e-5

    rows = {d: step_rows(d) for d in (http, job)}
    assert len(rows[http]) == len(rows[job]) == 2 * 8 // 4
    keys = ("loss", "loss/dpo", "loss/positive_kd", "loss/negative_kd", "grad_norm")
    loss_diff = max(abs(a[k] - b[k]) for a, b in zip(rows[http], rows[job]) for k in keys)
    got, want = read_json(http / "manifest.json"), read_json(job / "manifest.json")
    for epoch, metrics in want["heldout"].items():
        for k, v in metrics.items():
            loss_diff = max(loss_diff, abs(got["heldout"][epoch][k] - v))
    params = [load_checkpoint_model(str(d), STUDENT, tok.vocab_size) for d in (http, job)]
    param_diff = max(float((a - b).abs().max()) for a, b in
                     zip(params[0].parameters(), params[1].parameters()))
    step_s = {d.name: float(np.mean([r["step_s"] for r in rows[d]])) for d in (http, job)}
    fetch = [line for line in log.splitlines() if " rows from the server in " in line]
    print(f"\nHTTP vs in-job teacher: max |diff| top-k log-probs {topk_diff:.2e}, losses "
          f"{loss_diff:.2e}, params {param_diff:.2e}; step time {step_s['http'] * 1000:.0f} ms "
          f"vs {step_s['job'] * 1000:.0f} ms; {fetch[0].strip() if fetch else ''}")
    assert loss_diff < 1e-5 and param_diff < 1e-5
