"""The teacher of distillation, behind one small interface: held in the job, or served.

Both kinds `sample` answers to prompts (the positives' candidates) and give the training loop
their `view` of the training rows (stages.engine.pair_batches.TeacherLogits):

- `CheckpointTeacher`: a pipeline checkpoint loaded in the job; online logits, or (loss.teacher_topk
  > 0) its top-k written once to `teacher_topk_{values,indices}.npy`, after which it is freed.
- `ServedTeacher`: `distill.teacher: {kind: http, url, model, top_k}`, an OpenAI-compatible server
  (vLLM's API, data_recipes.openai_client). It samples through chat completions (the generator
  backend of sft_data, its response cache included, so a restart pays for nothing twice) and
  gives its top-k log-probs of every row through `prompt_logprobs` on completions, the row sent
  as token ids, into the same two files. The top-k of the tokens the server sampled (`logprobs`)
  are not used: the positive is re-encoded with our chat template, and only the kept positives
  matter, so one scoring pass over the final rows is both exact and cheaper. Before any work the
  server must serve the model, tokenize a probe text as the student's tokenizer does, and take
  a whole row (max_model_len).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_recipes.chat import Message
from data_recipes.generators import GeneratorConfig, HTTPGenerator
from data_recipes.openai_client import TeacherServer, TeacherServerConfig
from data_recipes.tokenizer_loading import tokenizer_mismatch
from stages.contract import MANIFEST, StageSpec, read_json
from stages.engine import distributed
from stages.engine.checkpoint import checkpoint_model
from stages.engine.generate import EngineGenerator, load_checkpoint_model
from stages.engine.pair_batches import TeacherLogits, read_teacher_topk, write_teacher_topk
from stages.engine.progress import Progress
from stages.engine.tokenizer import tokenizer_of_stage


def sample_answers(model, tok, cfg, prompts: list[str], n: int, seed: int) -> list[list[str]]:
    """n sampled chat answers per prompt (sample j uses seed + j, so a rerun samples the same)."""
    per_seed = []
    for j in range(n):
        gen = EngineGenerator(model, tok, GeneratorConfig(
            kind="engine", temperature=cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens, seed=seed + j, batch_size=cfg.sample_batch_size))
        per_seed.append(gen.complete([[Message("user", p)] for p in prompts]))
    return [[answers[i] for answers in per_seed] for i in range(len(prompts))]


def checked_tokenizer(spec: StageSpec):
    """The student's tokenizer, checked against a teacher stage's own before any work: a mismatch
    makes the KD meaningless (a served teacher is checked by ServedTeacher)."""
    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    if spec.inputs.get("teacher_tokenizer"):
        why = tokenizer_mismatch(tok, tokenizer_of_stage(spec.inputs["teacher_tokenizer"]))
        if why:
            raise ValueError(f"teacher_tokenizer: the teacher's tokenizer is not the student's: "
                             f"{why}; distillation compares token distributions, so both must "
                             "use one tokenizer")
    return tok


class CheckpointTeacher:
    """The teacher held in the job (the checkpoint of the stage `teacher` names), frozen."""

    def __init__(self, spec: StageSpec, cfg, vocab: int):
        self.model_cfg = checkpoint_model(
            spec.model, read_json(Path(spec.inputs["teacher"]) / MANIFEST), cfg.teacher_model)
        self.model = load_checkpoint_model(spec.inputs["teacher"], self.model_cfg, vocab)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.description = dataclasses.asdict(self.model_cfg)
        self.summary = f"teacher {self.model_cfg.num_layers}x{self.model_cfg.hidden_size}"

    def sample(self, tok, cfg, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        return sample_answers(self.model, tok, cfg, prompts, n, seed)

    def view(self, out: Path, cfg, encoded, pad_id: int, vocab: int, seq_length: int,
             info) -> TeacherLogits:
        """Online logits, or (loss.teacher_topk > 0) the top-k cached once on disk; then the
        model is released (`free`)."""
        if not cfg.loss.teacher_topk:
            return TeacherLogits(teacher=self.model)
        if read_teacher_topk(out) is None and info.rank == 0:
            write_teacher_topk(self.model, encoded, pad_id, vocab, cfg.loss.teacher_topk,
                               seq_length, cfg.micro_batch_size, info.device, out)
        distributed.barrier()
        return TeacherLogits(topk=read_teacher_topk(out))

    def free(self) -> None:
        self.model = None  # a cached top-k holds no reference to it: freed


class ServedTeacher:
    """A teacher behind an OpenAI-compatible server, checked before any work."""

    def __init__(self, server_cfg: TeacherServerConfig, tok, seq_length: int, out: Path,
                 concurrency: int):
        self.cfg, self.concurrency = server_cfg, max(1, concurrency)
        self.server = TeacherServer(server_cfg)
        why = self.server.problem(tok, min_model_len=seq_length + 2)  # a row + 1 generated
        if why:
            raise ValueError(f"teacher{'.' + why[0] if why[0] else ''}: {why[1]}")
        self.generator = HTTPGenerator(
            GeneratorConfig(kind="http", url=server_cfg.url, model=server_cfg.model,
                            api_key_env=server_cfg.api_key_env, concurrency=self.concurrency),
            out / "http_cache-teacher.jsonl")
        self.description = {"kind": "http", "url": server_cfg.url, "model": server_cfg.model,
                            "top_k": server_cfg.top_k}
        self.summary = f"teacher {server_cfg.model!r} at {server_cfg.url}"

    def sample(self, tok, cfg, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        """Like CheckpointTeacher.sample: sample j asks the server with seed + j."""
        per_seed = []
        for j in range(n):
            # one generator (one response cache) for every seed: the seed is part of the body
            self.generator.cfg = dataclasses.replace(
                self.generator.cfg, temperature=cfg.temperature, top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens, seed=seed + j)
            per_seed.append(self.generator.complete([[Message("user", p)] for p in prompts]))
        return [[answers[i] for answers in per_seed] for i in range(len(prompts))]

    def view(self, out: Path, cfg, encoded, pad_id: int, vocab: int, seq_length: int,
             info) -> TeacherLogits:
        """The server's top-k of every row, fetched once into the cached top-k files."""
        if read_teacher_topk(out) is None and info.rank == 0:
            t0 = time.time()
            write_served_topk(self.server, encoded, self.cfg.top_k, seq_length, vocab,
                              self.concurrency, out)
            print(f"teacher top-{self.cfg.top_k} of {2 * len(encoded)} rows from the server in "
                  f"{time.time() - t0:.1f} s", flush=True)
        distributed.barrier()
        return TeacherLogits(topk=read_teacher_topk(out))

    def free(self) -> None:
        pass


def build_teacher(spec: StageSpec, cfg, tok, vocab: int, seq_length: int):
    if isinstance(cfg.teacher, TeacherServerConfig):
        return ServedTeacher(cfg.teacher, tok, seq_length, spec.out, cfg.sample_batch_size)
    return CheckpointTeacher(spec, cfg, vocab)


def write_served_topk(server: TeacherServer, encoded, k: int, seq_length: int, vocab: int,
                      concurrency: int, out: Path) -> None:
    """`write_teacher_topk`'s two files ([2 * pairs, seq_length, k], row 2i the positive of pair
    i, 2i + 1 its negative) from the server's prompt log-probs, `concurrency` rows in flight."""
    shape = (2 * len(encoded), seq_length, k)
    files = {name: out / f"teacher_topk_{name}.npy" for name in ("values", "indices")}
    arrays = {name: np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+",
                                              dtype=np.float32 if name == "values" else np.int32,
                                              shape=shape) for name, path in files.items()}
    rows = [ids for pair in encoded for ids, _ in pair]  # row 2i + j: pair i, answer j
    progress = Progress(len(rows), "teacher rows scored", every=max(len(rows) // 10, 1))
    with ThreadPoolExecutor(concurrency) as pool:
        for r, (values, indices) in enumerate(pool.map(lambda ids: server.prompt_topk(ids, k),
                                                        rows)):
            n = len(values)
            top = np.asarray(indices, dtype=np.int64).reshape(n, k)
            if n and (top.min() < 0 or top.max() >= vocab):
                raise ValueError(f"teacher: the server returned token id {int(top.max())}, "
                                 f"outside the student's vocabulary of {vocab}")
            arrays["values"][r, :n] = np.asarray(values, dtype=np.float32).reshape(n, k)
            arrays["indices"][r, :n] = top
            progress.advance()
    progress.close()
    for name, path in files.items():
        arrays[name].flush()
        path.with_suffix(".tmp.npy").replace(path)
