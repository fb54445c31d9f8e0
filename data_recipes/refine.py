"""Deliberative generation refinement and chain-of-thought reconstruction (Nanbeige4-3B, §3.2).

For each prompt: the drafter writes an answer, the first evaluator writes a checklist for the
instruction, every evaluator judges the answer item by item (an item passes only if all pass it),
and while too few items pass, the reviser rewrites the answer from the critiques, up to
`max_rounds` evaluations. An accepted answer then goes to the CoT model, which writes a summary and
a full reasoning trace ending in that answer; the SFT sample is the prompt plus an assistant turn
whose thinking block is the trace and whose content is the refined answer.

Batched by round over the samples still in play; every sample that finishes (accepted with its
CoT, or rejected) is handed to `on_finished` at the end of its round, with its whole provenance,
so a caller that saves them loses at most one round's work to a crash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from data_recipes.chat import Message
from data_recipes.generators import Generator, Verdict
from data_recipes.prompts import Prompt


@dataclass
class RefineRoles:
    drafter: Generator
    evaluators: list[Generator]
    reviser: Generator
    cot: Generator


@dataclass
class Sample:
    id: str
    prompt: str
    checklist: list[str] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    """One per evaluation: the answer judged, each evaluator's verdicts, the share passed."""
    status: str = "pending"
    """pending | accepted | rejected"""
    final_answer: str = ""
    summary: str = ""
    reasoning: str = ""
    messages: list[dict] = field(default_factory=list)
    """The SFT sample (accepted only): [system,] user, assistant(reasoning, content)."""

    @property
    def answer(self) -> str:
        return self.rounds[-1]["answer"]


def combine(per_evaluator: list[list[Verdict]]) -> list[Verdict]:
    """An item passes only if every evaluator passes it; critiques of all who failed it are kept."""
    out = []
    for verdicts in zip(*per_evaluator):
        failed = [v.critique for v in verdicts if not v.passed]
        out.append(Verdict(verdicts[0].item, not failed, " / ".join(c for c in failed if c)))
    return out


def refine(prompts: list[Prompt], roles: RefineRoles, *, max_rounds: int,
           accept_min_pass: float = 1.0, system_prompt: str = "",
           on_finished: Callable[[list[Sample], int], None] = lambda samples, round_: None
           ) -> list[Sample]:
    """Run the loop over `prompts`; returns every sample (accepted or rejected), prompt order."""
    samples = [Sample(p.id, p.text) for p in prompts]
    if not samples:
        return samples
    texts = [s.prompt for s in samples]
    drafts = roles.drafter.draft(texts)
    for s, checklist in zip(samples, roles.evaluators[0].checklist(texts)):
        s.checklist = checklist
    active = list(samples)
    answers = drafts
    for round_ in range(max_rounds):
        prompts_, lists = [s.prompt for s in active], [s.checklist for s in active]
        judged = [ev.evaluate(prompts_, lists, answers) for ev in roles.evaluators]
        accepted, failing = [], []
        for i, s in enumerate(active):
            verdicts = combine([j[i] for j in judged])
            share = sum(v.passed for v in verdicts) / len(verdicts)
            s.rounds.append({"answer": answers[i], "passed_share": share,
                             "verdicts": [[asdict(v) for v in j[i]] for j in judged]})
            (accepted if share >= accept_min_pass else failing).append((s, verdicts))
        for s, _ in accepted:
            s.status, s.final_answer = "accepted", s.answer
        if accepted:
            cots = roles.cot.reconstruct_cot([s.prompt for s, _ in accepted],
                                            [s.final_answer for s, _ in accepted])
            for (s, _), cot in zip(accepted, cots):
                s.summary, s.reasoning = cot.summary, cot.reasoning
                s.messages = ([asdict(Message("system", system_prompt))] if system_prompt else []) + [
                    asdict(Message("user", s.prompt)),
                    asdict(Message("assistant", s.final_answer, cot.reasoning))]
        last = round_ == max_rounds - 1
        if last:
            for s, _ in failing:
                s.status = "rejected"
        finished = [s for s, _ in accepted] + ([s for s, _ in failing] if last else [])
        on_finished(finished, round_)
        if last or not failing:
            break
        active = [s for s, _ in failing]
        critiques = [[f"{v.item} {v.critique}".strip() for v in verdicts if not v.passed]
                     for _, verdicts in failing]
        answers = roles.reviser.revise([s.prompt for s in active], [s.answer for s in active],
                                       critiques)
    return samples


def round_stats(samples: list[Sample], max_rounds: int) -> list[dict[str, int]]:
    """Per round: how many were evaluated, accepted, revised after it, rejected after it."""
    stats = []
    for r in range(max_rounds):
        evaluated = [s for s in samples if len(s.rounds) > r]
        ended_here = [s for s in evaluated if len(s.rounds) == r + 1]
        stats.append({
            "evaluated": len(evaluated),
            "accepted": sum(s.status == "accepted" for s in ended_here),
            "rejected": sum(s.status == "rejected" for s in ended_here),
            "revised": len(evaluated) - len(ended_here)})
    return stats
