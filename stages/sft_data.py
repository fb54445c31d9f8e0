"""The `sft_data` stage: deliberative refinement + CoT reconstruction over a prompt set.

    python -m stages.sft_data --spec <output_dir>/spec.json

Outputs in the stage dir:
  records/shard-NNNNN.jsonl   every finished sample with its provenance (appended as they finish)
  data.jsonl                  the accepted SFT samples ({"id", "messages"}), prompt order
  store/<name>.*              the same in the SFT store (token ids + loss mask), when the stage
                              has a `tokenizer` (data_recipes.sft_store)
  samples.jsonl               the table for MLflow: prompt, draft, critiques, final answer, CoT
  http_cache-<role>.jsonl     responses of http backends (a rerun never pays for them twice)
Resume: prompts with a record are not touched again; only unfinished ones are redone.
Parallel: `workers > 1` runs shards as Ray tasks (http and oracle backends); an engine backend
runs in this process, where the model is loaded once and prompts are batched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from data_recipes.backends import build_generator
from data_recipes.prompts import Prompt, load_prompts
from data_recipes.ray_tasks import as_finished
from data_recipes.refine import RefineRoles, Sample, refine, round_stats
from stages.engine import job
from data_recipes.generators import GeneratorConfig
from stages.configs.data import SFTDataConfig
from stages.engine.checkpoint import checkpoint_model
from stages.engine.progress import Progress
from data_recipes.config_fields import from_dict
from stages.contract import MANIFEST, StageSpec, read_json, write_jsonl_atomic
from stages.engine.tracking import MetricLogger

ROLES = ("drafter", "reviser", "cot")


def role_configs(cfg: SFTDataConfig) -> dict[str, GeneratorConfig]:
    roles = {r: getattr(cfg, r) for r in ROLES}
    roles.update({f"evaluator{i}": e for i, e in enumerate(cfg.evaluators)})
    return roles


def build_roles(cfg: SFTDataConfig, out: Path, engine=None) -> RefineRoles:
    """The backends of every role; `engine` builds the engine-backed ones (None: none allowed)."""
    built = {}
    for name, gcfg in role_configs(cfg).items():
        if gcfg.kind == "engine":
            if engine is None:
                raise ValueError(f"{name}: an engine backend cannot run in a Ray worker; set "
                                 "workers: 1")
            built[name] = engine(gcfg)
        else:
            built[name] = build_generator(gcfg, out / f"http_cache-{name}.jsonl")
    return RefineRoles(built["drafter"], [built[f"evaluator{i}"] for i in range(len(cfg.evaluators))],
                       built["reviser"], built["cot"])


def _append(path: Path, samples: list[Sample]) -> None:
    from dataclasses import asdict

    with open(path, "a", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(records_dir: Path) -> dict[str, dict]:
    """Finished samples by id (a line cut short by a kill is ignored: its sample is redone)."""
    done = {}
    for path in sorted(records_dir.glob("shard-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["id"]] = rec
    return done


def refine_shard(cfg: SFTDataConfig, prompts: list[Prompt], path: Path, out: Path,
                 roles: RefineRoles | None = None) -> int:
    """Refine one shard, appending finished samples to `path`; returns how many finished."""
    roles = roles or build_roles(cfg, out)
    samples = refine(prompts, roles, max_rounds=cfg.max_rounds,
                     accept_min_pass=cfg.accept_min_pass, system_prompt=cfg.system_prompt,
                     on_finished=lambda finished, _round: _append(path, finished))
    return len(samples)


def _engine_factory(spec: StageSpec):
    """Load the `engine` stage's checkpoint once; every engine role samples from it."""
    from stages.engine import distributed
    from stages.engine.generate import EngineGenerator, load_checkpoint_model
    from stages.engine.tokenizer import tokenizer_of_stage

    if not spec.inputs.get("engine") or not spec.inputs.get("tokenizer"):
        raise ValueError("engine, tokenizer: an engine backend needs both (the checkpoint's stage "
                         "and its tokenizer stage)")
    info = distributed.init(seed=0)
    if info.world_size != 1:
        raise ValueError("sft_data runs as one process (launcher.nproc_per_node: 1)")
    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    model_cfg = checkpoint_model(spec.model, read_json(Path(spec.inputs["engine"]) / MANIFEST),
                                 None)
    model = load_checkpoint_model(spec.inputs["engine"], model_cfg, tok.vocab_size)
    print(f"engine backend: {spec.inputs['engine']} ({model_cfg.num_layers} layers, "
          f"hidden {model_cfg.hidden_size})", flush=True)
    return lambda gcfg: EngineGenerator(model, tok, gcfg)


def _uses_engine(cfg: SFTDataConfig) -> bool:
    return any(g.kind == "engine" for g in role_configs(cfg).values())


def run(spec: StageSpec) -> dict[str, Any]:
    from stages.engine import distributed

    try:
        return _run(spec)
    finally:
        distributed.teardown()  # the engine backend's process group, when there is one


def _run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(SFTDataConfig, spec.config)
    out = spec.out
    records_dir = out / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(spec)
    prompts = [p for pc in [cfg.prompts, *cfg.more_prompts] for p in load_prompts(pc)]
    if not prompts:
        raise ValueError("prompts: the prompt set is empty")
    done = read_records(records_dir)
    todo = [p for p in prompts if p.id not in done]
    shards = [todo[i:i + cfg.shard_size] for i in range(0, len(todo), cfg.shard_size)]
    first_shard = len(list(records_dir.glob("shard-*.jsonl")))
    print(f"{len(prompts)} prompts: {len(done)} finished earlier, {len(todo)} to refine in "
          f"{len(shards)} shards", flush=True)

    t0 = time.time()
    engine = None
    if shards and _uses_engine(cfg):
        if cfg.workers > 1:
            raise ValueError("workers: engine backends run in the stage's process; set workers: 1")
        engine = _engine_factory(spec)
    paths = [records_dir / f"shard-{first_shard + i:05d}.jsonl" for i in range(len(shards))]
    progress = Progress(len(todo), "refined")
    if cfg.workers > 1 and shards:
        for n in as_finished(refine_shard, [(cfg, shard, path, out)
                                            for shard, path in zip(shards, paths)]):
            progress.advance(n)
    else:
        roles = build_roles(cfg, out, engine)
        for i, (shard, path) in enumerate(zip(shards, paths)):
            refine_shard(cfg, shard, path, out, roles)
            n = sum(len(s) for s in shards[:i + 1])
            rate = n / max(time.time() - t0, 1e-9)
            progress.update(n, f"{rate:.2f} samples/s")
            logger.log(i, {"refined": n, "samples_per_s": rate})
    progress.close()
    seconds = time.time() - t0

    # --- outputs ---------------------------------------------------------------------------------
    records = read_records(records_dir)
    missing = [p.id for p in prompts if p.id not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts have no record after refinement")
    samples = [Sample(**records[p.id]) for p in prompts]
    accepted = [s for s in samples if s.status == "accepted"]
    write_jsonl_atomic(out / "data.jsonl", [{"id": s.id, "messages": s.messages} for s in accepted])
    table = [{"id": s.id, "prompt": s.prompt, "status": s.status, "rounds": len(s.rounds),
              "draft": s.rounds[0]["answer"],
              "critiques": [_critiques(r) for r in s.rounds],
              "final_answer": s.final_answer, "summary": s.summary, "reasoning": s.reasoning}
             for s in samples]
    write_jsonl_atomic(out / "samples.jsonl", table)
    stats = round_stats(samples, cfg.max_rounds)
    for r, st in enumerate(stats):
        logger.log(r, {f"round/{k}": v for k, v in st.items()})
    summary = {"prompts": len(prompts), "accepted": len(accepted),
               "rejected": len(samples) - len(accepted), "drafted": len(samples),
               "revised": sum(st["revised"] for st in stats),
               "refined_this_run": len(todo),
               "samples_per_s": len(todo) / seconds if todo and seconds > 0 else None}
    logger.log(len(stats), {k: v for k, v in summary.items() if v is not None})
    logger.artifact(out / "samples.jsonl")
    logger.table(table, "samples_table.json")  # MLflow shows it as a table
    logger.close()
    print(f"accepted {summary['accepted']}, rejected {summary['rejected']} of {len(prompts)}; "
          f"per round: {stats}", flush=True)
    return {**summary, "rounds": stats, "data": str((out / "data.jsonl").resolve()),
            **_sft_store(spec, out / "data.jsonl"),
            "samples": str((out / "samples.jsonl").resolve())}


def _sft_store(spec: StageSpec, data: Path) -> dict[str, Any]:
    """The accepted samples in the SFT store as well (data_recipes.sft_store), tokenized with the
    `tokenizer` stage's tokenizer when there is one; `sft` memory-maps it (and encodes data.jsonl
    itself for another tokenizer)."""
    if not spec.inputs.get("tokenizer"):
        return {}
    from data_recipes.sft_store import store_from_samples
    from stages.contract import sha256_file
    from stages.engine.tokenizer import tokenizer_of_stage

    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    tok_sha = sha256_file(tok.model_file)
    (spec.out / "store").mkdir(exist_ok=True)
    entry = store_from_samples(data, spec.out / "store" / spec.name, spec.name, tok, tok_sha)
    entry["shards"] = [f"store/{spec.name}"]  # relative to the stage dir, which may move
    return {"sft_store": {"tokenizer_sha256": tok_sha, "thinking": "on", "datasets": [entry]}}


def _critiques(round_: dict) -> list[str]:
    """Every failed item's critique in one round, from all evaluators."""
    return [f"{v['item']} {v['critique']}".strip() for verdicts in round_["verdicts"]
            for v in verdicts if not v["passed"]]


if __name__ == "__main__":
    job.main(run)
