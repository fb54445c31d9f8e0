"""The `eval` stage: verifiable benchmarks on any checkpoint, logged to MLflow.

    python -m stages.eval --spec <output_dir>/spec.json

Greedy exact match of the final answer, and pass@k from `samples` sampled answers per prompt
(the unbiased estimator of Chen et al. 2021: 1 - C(n-c, k) / C(n, k)). The task's checker
(data_recipes.verifiers) decides correctness: arithmetic, data_recipes.arithmetic.check_answer
on the `Answer: N` line; code, the task's asserts or stdin/stdout cases run in the sandbox; a
file set, its `task` (math by default: math-verify against the file's answers).
A chat-tuned model is prompted with the chat template; a base model with `completion_template`.
Every prompt, answer and verdict goes to eval_samples.jsonl (an MLflow artifact).

With `benchmarks` (data_recipes.benchmarks: HumanEval built in, GSM8K/MATH-style files), each
runs with its own template, few-shot examples, sampling and checker; its metrics are logged as
eval/<name>/<metric>, its answers go to eval_samples-<name>.jsonl, and eval_results.md/.json
hold one row per benchmark.

With `tools` (the QA eval of a tool-using model, Jan-nano), every prompt is answered greedily
through the multi-turn tool loop RL trains with (stages.engine.tool_rollout: the tools listed in
the system prompt, calls run, results forced through the KV cache) and again with no tools
offered (the plain prompt, one turn): `accuracy_with_tools`, `accuracy_without_tools`, the
tool counts per answer, and pass@k over `samples` sampled answers with tools.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from data_recipes import benchmarks as bench
from data_recipes.chat import final_text
from data_recipes.config_fields import from_dict
from data_recipes.generators import GeneratorConfig
from data_recipes.prompts import Task, load_tasks
from data_recipes.verifiers import check
from stages.configs.eval import EvalConfig
from stages.contract import MANIFEST, StageSpec, read_json
from stages.engine import job
from stages.engine.checkpoint import checkpoint_model
from stages.engine.generate import EngineGenerator, load_checkpoint_model
from stages.engine.progress import Progress
from stages.engine.tokenizer import tokenizer_of_stage
from stages.engine.tracking import MetricLogger
from stages.engine.training import job_world


pass_at_k = bench.pass_at_k


def score(tasks: list[Task], texts: list[str], prompt_format: str, kind: str = "arithmetic",
          ) -> list[bool]:
    """Exact match of each generation's final answer (passing every test, for code)."""
    finals = [final_text(t, prompt_format) for t in texts]
    forced = {"arithmetic": "arithmetic", "code": "code"}.get(kind)  # else each task's own
    return [s == 1.0 for s in check(tasks, finals, checker=forced)]


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
        if cfg.benchmarks:
            return run_benchmarks(spec, cfg, model, tok, t0)
        if cfg.tools is not None:
            return run_tool_qa(spec, cfg, model, tok, t0)
        tasks, kind = load_tasks(cfg.prompts), cfg.prompts.kind
        _need_answers(tasks, "prompts")
        chats = [t.chat() for t in tasks]
        logger = MetricLogger(spec)
        # greedy, then `samples` sampled answers per prompt
        progress = Progress(len(tasks) * (1 + cfg.samples), "answers", min_interval_s=30.0)

        def answers(temperature: float, seed: int) -> list[str]:
            gen = EngineGenerator(model, tok, GeneratorConfig(
                kind="engine", temperature=temperature, top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.batch_size,
                prompt_format=cfg.prompt_format, completion_template=cfg.completion_template,
                thinking=cfg.thinking,
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


def run_benchmarks(spec: StageSpec, cfg: EvalConfig, model, tok, t0: float) -> dict[str, Any]:
    """Each benchmark: greedy answers, then `samples` sampled ones; its metrics, samples and row."""
    logger = MetricLogger(spec)
    results: dict[str, dict[str, float]] = {}
    for b in cfg.benchmarks:
        tasks = bench.benchmark_tasks(b)
        _need_answers(tasks, f"benchmarks.{b.name}.prompts", b.checker)
        chats = [bench.chat_of(b, t, cfg.prompt_format) for t in tasks]
        samples = cfg.samples if b.samples is None else b.samples
        progress = Progress(len(tasks) * (1 + samples), f"{b.name} answers", min_interval_s=30.0)

        def answers(temperature: float, seed: int) -> tuple[list[str], list[float]]:
            gen = EngineGenerator(model, tok, GeneratorConfig(
                kind="engine", temperature=temperature,
                top_p=cfg.top_p if b.top_p is None else b.top_p,
                max_tokens=cfg.max_new_tokens if b.max_new_tokens is None else b.max_new_tokens,
                seed=seed, batch_size=cfg.batch_size, prompt_format=cfg.prompt_format,
                completion_template="{prompt}",  # chat_of already applied the benchmark's template
                thinking=cfg.thinking, stop=bench.stop_of(b, cfg.stop, cfg.prompt_format)),
                progress)
            texts = gen.complete(chats)
            finals = [final_text(t, cfg.prompt_format) for t in texts]
            return texts, check(tasks, finals, checker=b.checker)

        temperature = cfg.temperature if b.temperature is None else b.temperature
        greedy, greedy_scores = answers(0.0, cfg.seed)
        sampled = [answers(temperature, cfg.seed + 1 + j) for j in range(samples)]
        progress.close()
        results[b.name] = bench.summarize(greedy_scores, [s for _, s in sampled],
                                          cfg.k if b.k is None else b.k)
        logger.log(0, {f"eval/{b.name}/{k}": v for k, v in results[b.name].items()})
        table = spec.out / f"eval_samples-{b.name}.jsonl"
        with open(table, "w", encoding="utf-8") as f:
            for i, t in enumerate(tasks):
                f.write(json.dumps({"id": t.id, "prompt": chats[i][-1].content,
                                    "greedy": greedy[i], "score": greedy_scores[i],
                                    "sampled": [s[0][i] for s in sampled],
                                    "sampled_scores": [s[1][i] for s in sampled]}) + "\n")
        logger.artifact(table)
        print(f"{b.name}: " + " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in results[b.name].items()), flush=True)
    for path in bench.write_results_table(results, spec.out):
        logger.artifact(path)
    columns = sorted({m for r in results.values() for m in r})  # a table wants every column
    logger.table([{"benchmark": name, **{c: r.get(c) for c in columns}}
                  for name, r in results.items()], "eval_results_table.json")
    logger.close()
    return {"benchmarks": results, "seconds": time.time() - t0,
            "checkpoint_of": spec.inputs["init"], "results_file": str(spec.out / "eval_results.md")}


def run_tool_qa(spec: StageSpec, cfg: EvalConfig, model, tok, t0: float) -> dict[str, Any]:
    """`prompts` answered with the tools (greedy, then `samples` sampled) and without them."""
    from data_recipes.tools import build_toolbox
    from stages.engine.generate import SamplingConfig
    from stages.engine.tool_rollout import ToolLoop, answers, run_batched, tool_sums

    tasks = load_tasks(cfg.prompts)
    _need_answers(tasks, "prompts")
    logger = MetricLogger(spec)
    progress = Progress(len(tasks) * (2 + cfg.samples), "answers", min_interval_s=30.0)
    plain = EngineGenerator(model, tok, GeneratorConfig(
        kind="engine", temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed,
        batch_size=cfg.batch_size, prompt_format="chat", thinking=cfg.thinking,
        stop=list(cfg.stop)), progress)
    toolbox = build_toolbox(cfg.tools, str(spec.out / "tool_index"),
                            count_tokens=lambda s: len(tok.encode(s)))
    loop = ToolLoop(toolbox, tok, plain.stop_ids, max_turns=cfg.max_turns,
                    max_tokens=cfg.max_tokens, max_turn_tokens=cfg.max_new_tokens,
                    thinking=cfg.thinking)
    prompts = [loop.encode(t) for t in tasks]

    def with_tools(temperature: float, seed: int):
        sampling = SamplingConfig(temperature, cfg.top_p, cfg.max_new_tokens, seed)
        trajs = run_batched(loop, model, prompts, sampling, tok.vocab_size, cfg.batch_size)
        progress.advance(len(tasks))
        return trajs, answers(trajs, lambda new: final_text(plain.decode(new), "chat"))

    trajs, greedy = with_tools(0.0, cfg.seed)
    without = plain.complete([t.chat() for t in tasks])
    sampled = [with_tools(cfg.temperature, cfg.seed + 1 + j)[1] for j in range(cfg.samples)]
    progress.close()
    ok, ok_without = score(tasks, greedy, "chat", "qa"), score(tasks, without, "chat", "qa")
    per_sample = [score(tasks, s, "chat", "qa") for s in sampled]
    correct = [sum(s[i] for s in per_sample) for i in range(len(tasks))]
    result: dict[str, Any] = {
        "prompts": len(tasks), "accuracy_with_tools": sum(ok) / len(tasks),
        "accuracy_without_tools": sum(ok_without) / len(tasks),
        "answered_with_tools": sum(t.answered for t in trajs) / len(tasks),
        **{k: v / len(tasks) for k, v in tool_sums(trajs).items()}}
    if cfg.samples:
        for k in cfg.k:
            result[f"pass_at_{k}"] = sum(pass_at_k(cfg.samples, c, k) for c in correct) / len(tasks)
    result["seconds"] = time.time() - t0
    logger.log(0, {f"eval/{k}": v for k, v in result.items()})
    table = spec.out / "eval_samples.jsonl"
    with open(table, "w", encoding="utf-8") as f:
        for i, t in enumerate(tasks):
            f.write(json.dumps({"prompt": t.prompt, "answer": t.answer,
                                "with_tools": tok.decode(trajs[i].tokens), "final": greedy[i],
                                "correct": ok[i], "without_tools": without[i],
                                "correct_without_tools": ok_without[i],
                                "sampled_correct": correct[i]}) + "\n")
    logger.artifact(table)
    logger.close()
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in result.items()), flush=True)
    return {**result, "checkpoint_of": spec.inputs["init"], "samples_file": str(table)}


def _need_answers(tasks: list[Task], key: str, checker: str | None = None) -> None:
    """A set scored against reference answers must have one for every prompt (before sampling)."""
    needs = [t for t in tasks if (checker or t.checker) in ("math", "qa", "qa_f1", "qa_substring")]
    if any(t.answer is None for t in needs):
        n = sum(t.answer is None for t in needs)
        raise ValueError(f"{key}.answer_field: {n} prompts have no reference answer to be scored "
                         "against")


if __name__ == "__main__":
    job.main(run)
