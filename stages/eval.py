"""The `eval` stage: a verifiable benchmark on any checkpoint, logged to MLflow.

    python -m stages.eval --spec <output_dir>/spec.json

Greedy exact match of the final answer, and pass@k from `samples` sampled answers per prompt
(the unbiased estimator of Chen et al. 2021: 1 - C(n-c, k) / C(n, k)). The task's verifier
decides correctness: arithmetic, data_recipes.arithmetic.check_answer on the `Answer: N` line;
code, the task's public and private asserts run in the sandbox; jsonl, the math verifier
against the file's answers (data_recipes.rewards).
A chat-tuned model is prompted with the chat template; a base model with `completion_template`.
Every prompt, answer and verdict goes to eval_samples.jsonl (an MLflow artifact).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from data_recipes.arithmetic import check_answer
from data_recipes.chat import Message, final_text
from data_recipes.config_fields import from_dict
from data_recipes.generators import GeneratorConfig
from data_recipes.rewards import RewardConfig, Task, build_reward, load_tasks
from stages.configs.eval import EvalConfig
from stages.contract import MANIFEST, StageSpec, read_json
from stages.engine import job
from stages.engine.checkpoint import checkpoint_model
from stages.engine.generate import EngineGenerator, load_checkpoint_model
from stages.engine.progress import Progress
from stages.engine.tokenizer import tokenizer_of_stage
from stages.engine.tracking import MetricLogger
from stages.engine.training import job_world


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k answers drawn from n (c of them correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score(tasks: list[Task], texts: list[str], prompt_format: str, kind: str = "arithmetic",
          ) -> list[bool]:
    """Exact match of each generation's final answer (passing every test, for code)."""
    finals = [final_text(t, prompt_format) for t in texts]
    if kind == "arithmetic":
        return [check_answer(task.prompt, f) for task, f in zip(tasks, finals)]
    reward = build_reward(RewardConfig(kind="code" if kind == "code" else "math"))
    return [r == 1.0 for r in reward.score(tasks, finals, 1)]


def answered(texts: list[str], prompt_format: str, kind: str = "arithmetic") -> float:
    """The share of generations in the expected form, right or wrong (an `Answer: N` last line; a
    code block with a function): a model can learn the format before it learns the task."""
    form = _FUNCTION if kind == "code" else _ANSWER_LINE
    return sum(bool(form.search(final_text(t, prompt_format))) for t in texts) / len(texts)


_ANSWER_LINE = re.compile(r"Answer:\s*-?\d+\s*$")
_FUNCTION = re.compile(r"```python\n\s*def ")


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(EvalConfig, spec.config)
    with job_world(seed=cfg.seed) as info:
        if info.world_size != 1:
            raise ValueError("eval runs as one process (launcher.nproc_per_node: 1)")
        t0 = time.time()
        tok = tokenizer_of_stage(spec.inputs["tokenizer"])
        model_cfg = checkpoint_model(spec.model, read_json(Path(spec.inputs["init"]) / MANIFEST),
                                     cfg.model)
        model = load_checkpoint_model(spec.inputs["init"], model_cfg, tok.vocab_size)
        tasks, kind = load_tasks(cfg.prompts), cfg.prompts.kind
        if kind == "jsonl" and any(t.answer is None for t in tasks):
            raise ValueError(f"prompts.answer_field: every line of {cfg.prompts.path} needs a "
                             f"{cfg.prompts.answer_field!r} to be scored")
        chats = [[Message("user", t.prompt)] for t in tasks]
        logger = MetricLogger(spec)
        # greedy, then `samples` sampled answers per prompt
        progress = Progress(len(tasks) * (1 + cfg.samples), "answers", min_interval_s=30.0)

        def answers(temperature: float, seed: int) -> list[str]:
            gen = EngineGenerator(model, tok, GeneratorConfig(
                kind="engine", temperature=temperature, top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.batch_size,
                prompt_format=cfg.prompt_format, completion_template=cfg.completion_template,
                stop=list(cfg.stop)), progress)
            return gen.complete(chats)

        greedy = answers(0.0, cfg.seed)
        greedy_ok = score(tasks, greedy, cfg.prompt_format, kind)
        sampled = [answers(cfg.temperature, cfg.seed + 1 + j) for j in range(cfg.samples)]
        progress.close()
        per_sample = [score(tasks, s, cfg.prompt_format, kind) for s in sampled]
        correct = [sum(ok[i] for ok in per_sample) for i in range(len(tasks))]
        result: dict[str, Any] = {"prompts": len(tasks),
                                  "exact_match": sum(greedy_ok) / len(tasks),
                                  "answered": answered(greedy, cfg.prompt_format, kind)}
        if cfg.samples:
            for k in cfg.k:
                result[f"pass_at_{k}"] = sum(pass_at_k(cfg.samples, c, k)
                                          for c in correct) / len(tasks)
        result["seconds"] = time.time() - t0
        logger.log(0, {f"eval/{k}": v for k, v in result.items()})
        table = spec.out / "eval_samples.jsonl"
        with open(table, "w", encoding="utf-8") as f:
            for i, t in enumerate(tasks):
                f.write(json.dumps({"prompt": t.prompt, "greedy": greedy[i], "correct": greedy_ok[i],
                                    "sampled_correct": correct[i],
                                    "sampled": [s[i] for s in sampled]}) + "\n")
        logger.artifact(table)
        logger.close()
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in result.items()), flush=True)
        return {**result, "checkpoint_of": spec.inputs["init"], "samples_file": str(table)}


if __name__ == "__main__":
    job.main(run)
