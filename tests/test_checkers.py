"""Checkers (math-verify in the sandbox, stdin/stdout code cases, SQuAD QA), file prompt sets with
field maps and mixes, and the one `check` call that rewards, pair filters and eval share."""

import json
import time

import pytest

from data_recipes.code_check import IOCase, parse_io_cases, score_io
from data_recipes.config_fields import hash_view
from data_recipes.math_check import answers_equal, score_math_batch
from data_recipes.pairs import PairFilterConfig, TaskVerifier, build_scorer
from data_recipes.prompts import PromptsConfig, Task, load_prompts, load_tasks
from data_recipes.qa_check import exact_match, f1, normalize_answer, score_qa, substring_match
from data_recipes.rewards import RewardConfig, build_reward
from data_recipes.sandbox import SandboxLimits
from data_recipes.verifiers import check

# --- math ---

# The peer check's idea (issue 13): answer pairs with the verdict a grader should give. The first
# seven are the ones the old hand-written checker got wrong; it got 19 of these 27 right.
MATH_TABLE = [
    ("\\frac12", "1/2", True), ("(x+1)^2", "x^2+2x+1", True), ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\text{(B)}", "B", True), ("\\log_2 8", "3", True), ("x \\in (0, 2a]", "(0, 2a]", True),
    ("50\\%", "50", True),
    ("\\dfrac{3}{4}", "0.75", True), ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\pi/2", "\\frac{\\pi}{2}", True), ("x = 5", "5", True), ("1,234,567", "1234567", True),
    ("2^{10}", "1024", True), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("10\\%", "0.1", True), ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False), ("[1,2]", "[1,2)", False), ("0.75", "3/5", False),
    ("\\sqrt{2}", "1.41421", False), ("\\pi", "3.14", False), ("7", "-7", False),
    ("x^2+2x", "x^2+2x+1", False), ("\\text{(C)}", "B", False), ("(1, 2)", "(2, 1)", False),
    ("3", "\\log_2 9", False), ("9^{9^{9}}", "9", False),
]


def test_math_verify_table_in_the_sandbox():
    verdicts = answers_equal([p for p, _, _ in MATH_TABLE], [r for _, r, _ in MATH_TABLE])
    assert [(p, r) for (p, r, want), v in zip(MATH_TABLE, verdicts) if v != want] == []


def test_math_responses_and_references():
    responses = ["so \\boxed{\\frac{1}{2}}.", "Answer: 0.5", "I think it is 1/2",  # no final answer
                 "Answer: 72", "\\boxed{\\{2, 1\\}}", "**Answer:** $\\text{(B)}$"]
    references = ["1/2", "\\frac12", "1/2",
                  "She sold 48/2 = 24 clips in May.\n#### 72",  # GSM8K: the answer after ####
                  "so the set is $\\boxed{\\{1,2\\}}$",  # a MATH solution: its boxed answer
                  "B"]
    assert score_math_batch(responses, references) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_math_check_fails_closed_when_the_sandbox_kills_it():
    # math-verify cannot even be imported in 32 MB: the sandbox's limit holds, the verdict is "no"
    tiny = SandboxLimits(cpu_seconds=10, wall_seconds=20, memory_mb=32, max_processes=4)
    assert answers_equal(["1/2", "3"], ["0.5", "3"], limits=tiny, chunk=2) == [False, False]


# --- code: stdin/stdout cases ---

SUM = "```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))\n```"
CASES = [IOCase("1 2\n", "3\n"), IOCase("5 5 5", "15"), IOCase("", "0")]


def test_stdin_stdout_cases():
    assert score_io(SUM, CASES).status == "ok"
    wrong = score_io("print(3)", CASES)
    assert (wrong.reward, wrong.status, wrong.failed) == (0.0, "failed", (1, 2))
    assert "case 1" in wrong.detail
    start = time.monotonic()
    loop = score_io("while True:\n    pass", CASES, seconds=1)
    assert loop.status == "timeout" and loop.failed == (0, 1, 2)
    assert time.monotonic() - start < 10  # the first case's limit ended it
    hog = score_io("x = bytearray(400 * 2**20)\nprint(3)", CASES, memory_mb=128)
    assert hog.reward == 0.0 and hog.status != "ok"
    assert score_io("x = bytearray(40 * 2**20)\nprint(3)", CASES[:1], memory_mb=256).reward == 1.0


def test_io_case_formats():
    want = [IOCase("1 2", "3"), IOCase("4", "4")]
    apps = {"inputs": ["1 2", "4"], "outputs": ["3", "4"]}
    assert parse_io_cases(apps) == want and parse_io_cases(json.dumps(apps)) == want
    assert parse_io_cases([{"input": "1 2", "output": "3"}, {"input": "4", "output": "4"}]) == want
    assert parse_io_cases(["assert f(1) == 2"]) is None
    assert parse_io_cases({"inputs": [["1", "2"]], "outputs": [["3"]]}) == [IOCase("1\n2", "3")]


# --- qa ---

def test_squad_normalisation_and_scores():
    # values worked by hand from the official SQuAD v1.1 evaluate script's definitions
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("An apple, a day; the end.") == "apple day end"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert exact_match("Denver Broncos", "the Denver Broncos.") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    assert f1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    assert f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # multiset overlap
    assert f1("Santa Clara, California", "Levi's Stadium in the San Francisco Bay Area at "
              "Santa Clara, California.") == pytest.approx(6 / 14)  # P 3/3, R 3/11
    assert f1("the", "a") == 0.0  # nothing left after normalisation
    assert substring_match("It was held in Santa Clara, California.", "santa clara") == 1.0
    assert substring_match("Santa", "Santa Clara") == 0.0
    # several gold answers: the best one counts; the final answer line is the prediction
    assert score_qa("Thinking...\nAnswer: Denver Broncos", ("Broncos", "Denver Broncos")) == 1.0
    assert score_qa("Broncos", ["Denver Broncos", "Carolina"], "f1") == pytest.approx(2 / 3)


# --- one call for every checker ---

def test_check_dispatches_each_task_to_its_checker():
    tasks = [Task("a", "What is 2 + 3?", answer="5", checker="arithmetic"),
             Task("m", "x?", answer="\\frac12", checker="math"),
             Task("c", "add1", tests=("assert add1(1) == 2",), checker="code"),
             Task("i", "sum", tests=tuple(CASES), checker="code", limits=(2.0, 256)),
             Task("q", "who?", answer=("Denver Broncos",), checker="qa"),
             Task("f", "who?", answer="Denver Broncos", checker="qa_f1")]
    responses = ["Answer: 5", "Answer: 0.5", "def add1(x):\n    return x + 1", SUM,
                 "Answer: the Denver Broncos", "Broncos"]
    assert check(tasks, responses) == [1.0, 1.0, 1.0, 1.0, 1.0, pytest.approx(2 / 3)]
    assert check(tasks[:1], ["Answer: 6"]) == [0.0]
    with pytest.raises(ValueError, match="reference answer"):
        check([Task("x", "q", checker="math")], ["Answer: 1"])
    # the same verdicts through a reward (each prompt's own checker) and a pair filter
    assert build_reward(RewardConfig(kind="task", workers=2)).score(tasks[:2], responses[:2] * 1,
                                                                    1) == [1.0, 1.0]
    verifier = build_scorer(PairFilterConfig(task="prompts"), tasks)
    assert isinstance(verifier, TaskVerifier)
    assert verifier.score(["x?", "x?"], ["<think>\nAnswer: 1\n</think>\n\nAnswer: 1/2",
                                         "Answer: 2"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="task: 'sql'"):
        PairFilterConfig(task="sql")


# --- prompt sets from files ---

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_sets_with_a_field_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"What is {i} + 1?", "solution": str(i + 1), "sys": "Be brief."}
            for i in range(5)]
    cfg = dict(field="question", answer_field="solution", system_field="sys", num=4)
    by_jsonl = load_tasks(PromptsConfig(kind="jsonl", path=str(_jsonl(tmp_path / "q.jsonl", rows)),
                                        **cfg))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    by_parquet = load_tasks(PromptsConfig(kind="parquet", path=str(tmp_path), **cfg))  # a dir
    assert by_jsonl == by_parquet and len(by_jsonl) == 4
    assert by_jsonl[2].prompt == "What is 2 + 1?" and by_jsonl[2].answer == "3"
    assert by_jsonl[2].system == "Be brief." and by_jsonl[2].checker == "math"
    assert check(by_jsonl[:2], ["Answer: 1", "Answer: 3"]) == [1.0, 0.0]


def test_messages_tests_and_an_hf_dataset(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "You code."},
                          {"role": "user", "content": "Sum the numbers on stdin."},
                          {"role": "assistant", "content": "a reference reply"}],
             "tests": json.dumps({"inputs": ["1 2"], "outputs": ["3"]})}]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    cfg = dict(messages_field="messages", tests_field="tests", task="code", case_seconds=3.0)
    (task,) = load_tasks(PromptsConfig(kind="jsonl", path=str(path), **cfg))
    assert (task.prompt, task.system, task.history) == ("Sum the numbers on stdin.", "You code.", ())
    assert task.tests == (IOCase("1 2", "3"),) and task.limits == (3.0, 512)
    assert check([task], [SUM]) == [1.0]
    # the same rows through `datasets` (the json builder on a local file: offline)
    hf = load_tasks(PromptsConfig(kind="hf", name="json", data_files=[str(path)], **cfg))
    assert hf == [task]


def test_a_mix_by_weight(tmp_path):
    qa = _jsonl(tmp_path / "qa.jsonl", [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(50)])
    mix = PromptsConfig(kind="mix", num=20, seed=3, sets=[
        PromptsConfig(kind="arithmetic", max_digits=1, weight=3),
        PromptsConfig(kind="jsonl", path=str(qa), task="qa", weight=1)])
    tasks = load_tasks(mix)
    assert [t.checker for t in tasks].count("arithmetic") == 15
    assert [t.checker for t in tasks].count("qa") == 5
    assert tasks == load_tasks(mix) and len({t.id for t in tasks}) == 20
    assert [t.checker for t in tasks] != sorted(t.checker for t in tasks)  # interleaved
    assert [p.text for p in load_prompts(mix)] == [t.prompt for t in tasks]


def test_a_set_with_none_of_the_mapped_fields_is_refused(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(ValueError) as e:
        PromptsConfig(kind="jsonl", path=str(path))
    assert str(e.value) == (f"field: {path}:1 has none of the mapped fields (prompt); it has "
                            "question, answer")
    with pytest.raises(ValueError, match="^task: 'sql' is not a checker"):
        PromptsConfig(kind="jsonl", path=str(path), field="question", task="sql")
    with pytest.raises(ValueError, match="^sets:"):
        PromptsConfig(kind="mix")


def test_new_options_at_their_defaults_leave_the_hash_alone(tmp_path):
    old_fields = {"kind", "num", "split", "heldout_fraction", "seed", "max_digits", "path",
                  "field", "answer_field"}
    assert set(hash_view(PromptsConfig())) == old_fields
    assert hash_view(PromptsConfig(task="qa"))["task"] == "qa"
