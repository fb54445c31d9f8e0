"""SFT data construction: the refinement loop with oracles, the HTTP backend against a real local
server (errors, timeouts, cache), and resume of the sft_data stage after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from data_recipes.arithmetic import check_answer
from data_recipes.chat import Message
from data_recipes.generators import GenerationError, HTTPGenerator
from data_recipes.oracles import ArithmeticOracle
from data_recipes.prompts import load_prompts
from data_recipes.refine import RefineRoles, refine, round_stats
from data_recipes.splits import in_heldout
from data_recipes.generators import GeneratorConfig
from data_recipes.prompts import PromptsConfig
from stages.configs.data import SFTDataConfig
from stages.contract import StageSpec, read_json, save_spec
from stages.serve import ChatServer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = load_prompts(PromptsConfig(num=12, seed=5))


def oracle(error_rate: float = 0.0) -> ArithmeticOracle:
    return ArithmeticOracle(GeneratorConfig(error_rate=error_rate))


def run_refine(drafter, reviser, max_rounds=3, accept_min_pass=1.0, prompts=PROMPTS):
    roles = RefineRoles(drafter, [oracle()], reviser, oracle())
    return refine(prompts, roles, max_rounds=max_rounds, accept_min_pass=accept_min_pass)


def test_prompt_splits_are_disjoint_and_stable():
    train = load_prompts(PromptsConfig(num=200, seed=1, max_digits=2))
    held = load_prompts(PromptsConfig(num=30, seed=9, max_digits=2, split="heldout"))
    assert len(train) == 200 and len(held) == 30
    assert not {p.text for p in train} & {p.text for p in held}
    assert all(in_heldout(p.text, 0.1) for p in held)
    assert load_prompts(PromptsConfig(num=200, seed=1, max_digits=2)) == train


def test_wrong_drafts_are_revised_then_accepted_with_a_reconstructed_cot():
    samples = run_refine(drafter=oracle(error_rate=1.0), reviser=oracle(0.0))
    assert all(s.status == "accepted" and len(s.rounds) == 2 for s in samples)
    for s in samples:
        first = s.rounds[0]["verdicts"][0]
        assert [v["passed"] for v in first] == [True, False, True]  # only the result is wrong
        assert not check_answer(s.prompt, s.rounds[0]["answer"])
        assert check_answer(s.prompt, s.final_answer)
        user, assistant = s.messages
        assert user == asdict(Message("user", s.prompt))
        assert assistant["content"] == s.final_answer
        result = s.final_answer.rsplit("Answer: ", 1)[1]
        assert assistant["reasoning"].endswith(f"So the result is {result}.")
    assert round_stats(samples, 3) == [
        {"evaluated": 12, "accepted": 0, "rejected": 0, "revised": 12},
        {"evaluated": 12, "accepted": 12, "rejected": 0, "revised": 0},
        {"evaluated": 0, "accepted": 0, "rejected": 0, "revised": 0}]


def test_a_reviser_that_never_fixes_it_gets_samples_rejected_at_the_round_limit():
    samples = run_refine(drafter=oracle(1.0), reviser=oracle(1.0), max_rounds=3)
    assert all(s.status == "rejected" and len(s.rounds) == 3 and not s.messages for s in samples)
    assert all(r["passed_share"] == pytest.approx(2 / 3) for s in samples for r in s.rounds)


def test_acceptance_rule_is_the_share_of_checklist_items_passed():
    samples = run_refine(drafter=oracle(1.0), reviser=oracle(1.0), accept_min_pass=0.6)
    assert all(s.status == "accepted" and len(s.rounds) == 1 for s in samples)


def test_right_drafts_are_accepted_in_the_first_round():
    samples = run_refine(drafter=oracle(0.0), reviser=oracle(1.0))
    assert all(s.status == "accepted" and len(s.rounds) == 1 for s in samples)


def test_an_evaluator_that_disagrees_blocks_acceptance():
    class Strict(ArithmeticOracle):  # fails every answer on the steps item, with a critique
        def evaluate(self, prompts, checklists, answers):
            out = super().evaluate(prompts, checklists, answers)
            for verdicts in out:
                verdicts[2].passed, verdicts[2].critique = False, "too terse"
            return out

    roles = RefineRoles(oracle(0.0), [oracle(), Strict(GeneratorConfig())], oracle(), oracle())
    samples = refine(PROMPTS[:3], roles, max_rounds=2)
    assert all(s.status == "rejected" for s in samples)
    assert all(not s.rounds[0]["verdicts"][1][2]["passed"] for s in samples)


# --- HTTP backend ---------------------------------------------------------------------------------

def http_cfg(url: str, **kw) -> GeneratorConfig:
    return GeneratorConfig(**{"kind": "http", "url": url, "model": "oracle", "timeout_s": 0.5,
                              "max_retries": 3, "concurrency": 4, **kw})


def test_http_backend_plays_every_role_over_real_http(tmp_path):
    with ChatServer(draft_error_rate=0.0) as server:
        gen = HTTPGenerator(http_cfg(server.url), tmp_path / "cache.jsonl", backoff_s=0.01)
        roles = RefineRoles(gen, [gen], gen, gen)
        samples = refine(PROMPTS[:4], roles, max_rounds=2)
    assert all(s.status == "accepted" for s in samples)
    assert all(check_answer(s.prompt, s.final_answer) for s in samples)
    assert all(s.reasoning.startswith("column") or s.reasoning.startswith("partial")
               for s in samples)
    assert {role for role, _ in server.requests} == {"draft", "checklist", "evaluate", "cot"}


def test_http_backend_retries_server_errors_and_timeouts(tmp_path):
    with ChatServer(draft_error_rate=0.0, stall_s=1.5) as server:
        server.fail_next, server.stall_next = 2, 1
        gen = HTTPGenerator(http_cfg(server.url, concurrency=1), tmp_path / "c.jsonl",
                            backoff_s=0.01)
        drafts = gen.draft([p.text for p in PROMPTS[:2]])
    assert all(check_answer(p.text, d) for p, d in zip(PROMPTS, drafts))
    assert server.fail_next == 0 and server.stall_next == 0  # the failures were met and retried


def test_http_backend_gives_up_with_a_clear_error_and_loses_nothing(tmp_path):
    cache = tmp_path / "cache.jsonl"
    texts = [p.text for p in PROMPTS[:3]]
    with ChatServer(draft_error_rate=0.0) as server:
        first = HTTPGenerator(http_cfg(server.url), cache, backoff_s=0.01).draft(texts)
        server.always_fail = True
        with pytest.raises(GenerationError) as err:
            HTTPGenerator(http_cfg(server.url), cache, backoff_s=0.01).draft(
                texts + [PROMPTS[5].text])
        message = str(err.value)
        assert "failed after 4 attempts" in message and "HTTP 500" in message
        assert str(cache) in message and "3 responses are saved" in message
        # the paid-for answers survive: a new client (a rerun) gets them without asking
        n = len(server.requests)
        again = HTTPGenerator(http_cfg(server.url), cache, backoff_s=0.01).draft(texts)
        assert again == first and len(server.requests) == n


def test_http_backend_does_not_retry_a_client_error(tmp_path):
    with ChatServer() as server:
        gen = HTTPGenerator(http_cfg(server.url.replace("/v1", "/nope")), tmp_path / "c.jsonl")
        with pytest.raises(GenerationError, match="HTTP 404.*not retried"):
            gen.draft(["What is 1 + 1?"])


# --- the stage: resume after a kill ------------------------------------------------------------

@pytest.mark.slow
def test_sft_data_stage_resumes_after_sigkill_without_redoing_finished_samples(tmp_path):
    with ChatServer(draft_error_rate=0.5) as server:
        server.delay_s = 0.03
        http = asdict(http_cfg(server.url, concurrency=1))
        cfg = SFTDataConfig(prompts=PromptsConfig(num=24, seed=2), shard_size=4, max_rounds=2,
                            drafter=GeneratorConfig(**http), evaluators=[GeneratorConfig(**http)],
                            reviser=GeneratorConfig(**http), cot=GeneratorConfig(**http))
        spec = save_spec(StageSpec(name="sft_data", kind="sft_data", config=asdict(cfg),
                                   output_dir=str(tmp_path)))
        cmd = [sys.executable, "-m", "stages.sft_data", "--spec", str(spec)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        records = tmp_path / "records"
        deadline = time.time() + 60
        while sum(len(p.read_text().splitlines()) for p in records.glob("*.jsonl")) < 6:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "manifest.json").exists(), "finished before it was killed"
        finished = {}
        for path in records.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    finished[rec["id"]] = rec
                except json.JSONDecodeError:
                    pass
        for cache in tmp_path.glob("http_cache-*.jsonl"):
            cache.unlink()  # so any regeneration would have to reach the server
        server.requests.clear()
        rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{len(finished)} finished earlier" in rerun.stdout
    asked = {user for _, user in server.requests}
    done_prompts = {r["prompt"] for r in finished.values()}
    assert not any(p in text for p in done_prompts for text in asked)
    manifest = read_json(tmp_path / "manifest.json")
    assert manifest["drafted"] == 24 and manifest["refined_this_run"] == 24 - len(finished)
    data = [json.loads(line) for line in Path(manifest["data"]).read_text().splitlines()]
    assert len(data) == manifest["accepted"] > 0
    for rec in finished.values():  # what was saved before the kill is what the stage kept
        if rec["status"] == "accepted":
            assert {"id": rec["id"], "messages": rec["messages"]} in data


@pytest.mark.slow
def test_sft_data_on_ray_workers_makes_the_same_data_as_one_process(tmp_path):
    import ray

    from stages.sft_data import _run

    def make(out: Path, workers: int) -> dict:
        cfg = SFTDataConfig(prompts=PromptsConfig(num=30, seed=6), shard_size=8, workers=workers,
                            drafter=GeneratorConfig(error_rate=0.5, seed=1),
                            reviser=GeneratorConfig(error_rate=0.5, seed=2))
        return _run(StageSpec(name="d", kind="sft_data", config=asdict(cfg),
                              output_dir=str(out)))

    one = make(tmp_path / "one", 1)
    try:
        two = make(tmp_path / "two", 2)
    finally:
        ray.shutdown()
    assert 0 < one["accepted"] < 30 and one["rounds"] == two["rounds"]
    assert Path(one["data"]).read_text() == Path(two["data"]).read_text()
    assert len(list((tmp_path / "two" / "records").glob("shard-*.jsonl"))) == 4


def test_code_and_arithmetic_prompts_are_each_refined_by_their_own_oracle():
    from data_recipes.oracles import build_oracle
    from data_recipes.verifiers import score_code

    prompts = (load_prompts(PromptsConfig(kind="code", num=6, seed=1)) +
               load_prompts(PromptsConfig(num=3, max_digits=1)))
    fallible, exact = build_oracle(GeneratorConfig(error_rate=0.5)), build_oracle(GeneratorConfig())
    samples = refine(prompts, RefineRoles(fallible, [exact], fallible, exact), max_rounds=4)
    assert {s.id for s in samples} == {p.id for p in prompts}
    code = [s for s in samples if s.prompt.startswith("Write a one-line Python function")]
    assert len(code) == 6 and any(len(s.rounds) > 1 for s in samples)  # some drafts were wrong
    for s in code:
        if s.status == "accepted":  # the accepted answer passes the task's asserts, and says why
            answer = s.messages[-1]["content"]
            tests = [line for line in s.prompt.splitlines() if line.startswith("assert")]
            assert answer.startswith("```python\ndef ") and score_code(answer, tests).reward == 1.0
            assert "so the body is `return " in s.messages[-1]["reasoning"]
    arith = [s for s in samples if s not in code]
    assert all(s.final_answer.splitlines()[-1].startswith("Answer: ") for s in arith
               if s.status == "accepted")
