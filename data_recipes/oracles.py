"""Oracles: programmatic solvers and checkers for verifiable tasks, behind the generator interface.

They play the roles a teacher model plays (draft, checklist, evaluate, revise, reconstruct CoT,
score, prefer) exactly, so SFT data, DPD pairs and RL judges can be built and tested without a
model. `error_rate` makes a share of their answers wrong on purpose, decided by a hash of (seed,
role, input), so a rerun makes the same mistakes. `build_oracle` routes every prompt to the
oracle of its task (arithmetic questions, tiny coding tasks), so one prompt set may mix them.

`tool_trajectories` is the tool-use oracle (Jan-nano's tiny proof): multi-turn conversations
that answer data_recipes.tool_corpus questions by calling the real tools, the SFT warm start a
tiny model needs before tool RL.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import cache

from data_recipes import arithmetic
from data_recipes.code_tasks import make_code_tasks
from data_recipes.generators import (CoT, GenerationError, Generator, GeneratorConfig, Verdict,
                                     answer_only)
from data_recipes.verifiers import score_code_batch


class _Seeded(Generator):
    def __init__(self, cfg: GeneratorConfig):
        self.cfg = cfg

    def _rng(self, *parts: str) -> random.Random:
        h = hashlib.sha256("\x00".join((str(self.cfg.seed),) + parts).encode()).hexdigest()
        return random.Random(int(h[:16], 16))

    def complete(self, chats):
        raise GenerationError(f"the {type(self).__name__} only plays the roles it can do exactly; "
                              "it does not chat")



class ArithmeticOracle(_Seeded):
    """Solves and checks `What is A op B?` exactly, with the worked steps of data_recipes.arithmetic.

    `error_rate`: that share of its drafts and revisions is off by a small amount.
    """

    CHECKLIST = ["The last line is 'Answer: <integer>'.",
                 "The answer is the exact result.",
                 "The work is shown step by step."]

    def _problem(self, prompt: str) -> dict:
        solved = arithmetic.solve(prompt)
        if solved is None:
            raise GenerationError(f"the arithmetic oracle cannot read the prompt {prompt[:80]!r}")
        return solved

    def _solve(self, prompt: str, *why: str) -> str:
        p = self._problem(prompt)
        answer = p["answer"]
        rng = self._rng(prompt, *why)
        if rng.random() < self.cfg.error_rate:
            answer += rng.choice([-10, -2, -1, 1, 2, 10])
        return "\n".join(p["steps"] + [f"Answer: {answer}"])

    def draft(self, prompts):
        return [self._solve(p, "draft") for p in prompts]

    def checklist(self, prompts):
        return [list(self.CHECKLIST) for _ in prompts]

    def evaluate(self, prompts, checklists, answers):
        out = []
        for prompt, items, answer in zip(prompts, checklists, answers):
            unknown = [i for i in items if i not in self.CHECKLIST]
            if unknown:
                raise GenerationError(f"the arithmetic oracle cannot judge checklist item "
                                      f"{unknown[0]!r}; use it as the first evaluator")
            verdicts = []
            for item in items:
                if item == self.CHECKLIST[0]:
                    ok = bool(re.search(r"Answer:\s*-?\d+\s*$", answer))
                    why = "" if ok else "End with a line 'Answer: <integer>'."
                elif item == self.CHECKLIST[1]:
                    ok = arithmetic.check_answer(prompt, answer)
                    why = "" if ok else "The final answer is wrong: redo the computation."
                else:
                    ok = bool(re.search(r"^(column|partial|sum)", answer, re.MULTILINE))
                    why = "" if ok else "Show the column-by-column work."
                verdicts.append(Verdict(item, ok, why))
            out.append(verdicts)
        return out

    def revise(self, prompts, answers, critiques):
        return [self._solve(p, "revise", a, *c) for p, a, c in zip(prompts, answers, critiques)]

    def score(self, prompts, answers):
        return [float(arithmetic.check_answer(p, answer_only(a))) for p, a in zip(prompts, answers)]

    def prefer(self, prompts, a, b):
        """A right answer beats a wrong one; between two equally right ones, the shorter wins (a
        programmatic stand-in for a preference model that likes concise answers)."""
        out = []
        for p, x, y in zip(prompts, a, b):
            x, y = answer_only(x), answer_only(y)
            key_x = (arithmetic.check_answer(p, x), -len(x))
            key_y = (arithmetic.check_answer(p, y), -len(y))
            out.append(0.5 if key_x == key_y else float(key_x > key_y))
        return out

    def reconstruct_cot(self, prompts, answers):
        out = []
        for prompt, answer in zip(prompts, answers):
            steps = self._problem(prompt)["steps"]
            final = re.findall(r"Answer:\s*(-?\d+)", answer)
            result = final[-1] if final else answer.strip()
            out.append(CoT("Work through the digits column by column, then state the result.",
                           "\n".join(steps + [f"So the result is {result}."])))
        return out


@cache
def code_tasks() -> dict:
    """Every tiny coding task (both splits) by its one-line instruction."""
    return {t.prompt: t for split in ("train", "heldout")
            for t in make_code_tasks(10_000, 0, split)}


class CodeOracle(_Seeded):
    """Writes and checks the tiny coding tasks (data_recipes.code_tasks): the reference function in
    a code block, checked by running the task's asserts in the sandbox. `error_rate`: that share
    of its drafts and revisions return a wrong value."""

    CHECKLIST = ["The answer is one Python function in a ```python code block.",
                 "The function passes the task's tests."]

    def _task(self, prompt: str):
        task = code_tasks().get(prompt.split("\n", 1)[0])
        if task is None:
            raise GenerationError(f"the code oracle does not know the task {prompt[:80]!r}")
        return task

    def _solve(self, prompt: str, *why: str) -> str:
        solution = self._task(prompt).solution
        rng = self._rng(prompt, *why)
        if rng.random() < self.cfg.error_rate:  # wrong (or a TypeError), differently each time
            solution = solution.replace("    return ", f"    return {rng.randint(1, 9)} + ")
        return f"```python\n{solution}```"

    def draft(self, prompts):
        return [self._solve(p, "draft") for p in prompts]

    def checklist(self, prompts):
        return [list(self.CHECKLIST) for _ in prompts]

    def evaluate(self, prompts, checklists, answers):
        results = score_code_batch(answers, [self._task(p).tests for p in prompts])
        out = []
        for items, answer, result in zip(checklists, answers, results):
            verdicts = []
            for item in items:
                if item == self.CHECKLIST[0]:
                    ok = bool(re.search(r"```python\n\s*def ", answer))
                    verdicts.append(Verdict(item, ok, "" if ok else "Write the function in a "
                                                                    "```python block."))
                elif item == self.CHECKLIST[1]:
                    ok = result.reward == 1.0
                    verdicts.append(Verdict(item, ok, "" if ok else f"A test fails: "
                                                                    f"{result.detail[:120]}"))
                else:
                    raise GenerationError(f"the code oracle cannot judge checklist item {item!r}")
            out.append(verdicts)
        return out

    def revise(self, prompts, answers, critiques):
        return [self._solve(p, "revise", a, *c) for p, a, c in zip(prompts, answers, critiques)]

    def reconstruct_cot(self, prompts, answers):
        out = []
        for prompt in prompts:
            task = self._task(prompt)
            body = task.solution.split("return ", 1)[1].strip()
            out.append(CoT("One return statement computes the result.",
                           f"`{task.name}` must give back what the task asks for. In Python "
                           f"that is `{body}`, so the body is `return {body}`."))
        return out

    def score(self, prompts, answers):
        return [r.reward for r in score_code_batch(answers, [self._task(p).tests for p in prompts])]


class RoutingOracle(Generator):
    """Each prompt to the oracle of its task, in one batched call per oracle, answers in order."""

    def __init__(self, oracles: dict[str, Generator]):
        self.oracles = oracles

    def _kind(self, prompt: str) -> str:
        kind = "arithmetic" if arithmetic.solve(prompt) is not None else "code"
        if kind not in self.oracles:
            raise GenerationError(f"no {kind} oracle for the prompt {prompt[:80]!r} (oracle task: "
                                  f"{', '.join(self.oracles)})")
        return kind

    def _route(self, role: str, prompts: list[str], *columns: list) -> list:
        out: list = [None] * len(prompts)
        for kind, oracle in self.oracles.items():
            idx = [i for i, p in enumerate(prompts) if self._kind(p) == kind]
            if idx:
                results = getattr(oracle, role)([prompts[i] for i in idx],
                                                 *[[c[i] for i in idx] for c in columns])
                for i, r in zip(idx, results):
                    out[i] = r
        return out

    def complete(self, chats):
        raise GenerationError("an oracle plays the roles it can do exactly; it does not chat")

    def draft(self, prompts):
        return self._route("draft", prompts)

    def checklist(self, prompts):
        return self._route("checklist", prompts)

    def evaluate(self, prompts, checklists, answers):
        return self._route("evaluate", prompts, checklists, answers)

    def revise(self, prompts, answers, critiques):
        return self._route("revise", prompts, answers, critiques)

    def reconstruct_cot(self, prompts, answers):
        return self._route("reconstruct_cot", prompts, answers)

    def score(self, prompts, answers):
        return self._route("score", prompts, answers)

    def prefer(self, prompts, a, b):
        return self._route("prefer", prompts, a, b)


ORACLES = {"arithmetic": ArithmeticOracle, "code": CodeOracle}


def build_oracle(cfg: GeneratorConfig) -> Generator:
    """The oracle of `cfg.task`; `auto`: every task's, each prompt routed to its own."""
    if cfg.task == "auto":
        return RoutingOracle({name: cls(cfg) for name, cls in ORACLES.items()})
    if cfg.task not in ORACLES:
        raise ValueError(f"task: {cfg.task!r} has no oracle; one of auto, {', '.join(ORACLES)}")
    return ORACLES[cfg.task](cfg)


# --- tool-use trajectories ------------------------------------------------------------------------

def tool_trajectories(questions: list[dict], toolbox, system: str | None = None,
                      answer_template: str = "{answer}") -> list[dict]:
    """An oracle conversation per question ({question, answer, doc_ids} of
    data_recipes.tool_corpus), in Qwen3's tool format as the tool loop renders it: the tools in
    the system prompt, each call an assistant turn `<tool_call>{...}</tool_call>`, each result a
    user turn of `<tool_response>` blocks (the real tool's output), then the answer.

    The oracle searches with the question itself; for each document on the path (`doc_ids`: a
    2-hop question's second one is found by searching its title, read in the first) it visits
    the document unless the search preview already shows what it needs, and answers once the
    answer has been shown. `answer_template` words the final turn (e.g. "The answer is {answer}.":
    the answer then follows a space as it does in the documents, so a tiny model copies the same
    tokens). {"messages": [...], "calls": n} per question, for sft_tokenize (format: messages)."""
    import json

    from data_recipes.tools import ToolCall, tool_response_turn

    out = []
    for q in questions:
        messages = [{"role": "system", "content": toolbox.system_prompt(system)},
                    {"role": "user", "content": q["question"]}]
        seen, calls = "", 0

        def call(name: str, args: dict) -> str:
            nonlocal calls
            result = toolbox.run(ToolCall(name, args))
            if not result.ok:
                raise GenerationError(f"the tool oracle's own call failed: {result.observation}")
            body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
            messages.append({"role": "assistant", "content": f"<tool_call>\n{body}\n</tool_call>"})
            turn = tool_response_turn([result.observation])  # "<|im_start|>user\n...<|im_end|>\n"
            messages.append({"role": "user", "content": turn[len("<|im_start|>user\n"):
                                                             -len("<|im_end|>\n")]})
            calls += 1
            return result.observation

        query = q["question"]
        for hop, doc_id in enumerate(q["doc_ids"]):
            doc = toolbox.collection.get(doc_id)
            if hop:  # the next hop is named in what was read
                query = doc.title
            found = call("search", {"query": query})
            last = hop == len(q["doc_ids"]) - 1
            wanted = q["answer"] if last else toolbox.collection.get(q["doc_ids"][hop + 1]).title
            seen = found
            if f"id: {doc_id}\n" not in found or wanted not in found:
                seen = call("visit", {"id": doc_id})
        if q["answer"] not in seen:
            raise GenerationError(f"the tool oracle could not find {q['answer']!r} for "
                                  f"{q['question']!r}")
        messages.append({"role": "assistant",
                         "content": answer_template.format(answer=q["answer"])})
        out.append({"messages": messages, "calls": calls})
    return out
