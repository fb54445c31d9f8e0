"""Semantic checks of a schema-valid recipe, run before anything starts, and `load_recipe`.

    recipe = load_recipe("recipes/tiny.yaml", ["stages.pretrain.phases.2.tokens=65536"])

Each problem is `(key path, message)`; all of them are collected and raised together as a
RecipeError, so a user fixes a recipe in one round.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from data_recipes.openai_client import TeacherServer, TeacherServerConfig
from data_recipes.sources import missing_paths
from data_recipes.tokenizer_loading import SentencePieceTokenizer, load_tokenizer
from pipeline.memory_plan import memory_problems
from pipeline.graph import build_graph, stage_launcher, stage_model, stage_refs, topo_order
from pipeline.recipe import Recipe, RecipeError, read_recipe
from schedulers.fg_wsd import check as check_schedule
from schedulers.mixture import check_weights
from stages.configs.data import SFTTokenizeConfig, TokenizerConfig
from stages.configs.post_training import DistillConfig, SFTConfig
from stages.configs.postnas import PostNASConfig
from stages.configs.hf import (ExportConfig, ImportConfig, UnsupportedModel,
                               architecture_mismatch, export_problems, read_hf_config)
from stages.contract import MANIFEST, read_json
from stages.configs.pretrain import PretrainConfig
from stages.configs.rl import RLConfig
from schedulers.fg_wsd import phase_specs, pretrain_schedule

# Which kind each reference field must point at: by (stage kind, field) first, then by field
# (fields not listed may point anywhere).
CHECKPOINT_KINDS = ("pretrain", "sft", "distill", "rl", "import", "postnas")
TOKENIZER_KINDS = ("tokenizer", "import")
REF_KINDS = {"tokenizer": TOKENIZER_KINDS, "teacher_tokenizer": TOKENIZER_KINDS,
             "data": ("prepare",), "init": CHECKPOINT_KINDS, "engine": CHECKPOINT_KINDS,
             "student": CHECKPOINT_KINDS, "teacher": CHECKPOINT_KINDS, "judge": CHECKPOINT_KINDS,
             ("sft", "data"): ("sft_data", "sft_tokenize"),
             ("postnas", "init"): ("pretrain", "sft", "distill", "rl", "import"),
             ("sft", "more_data"): ("sft_data", "sft_tokenize")}


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                probe_servers: bool = False) -> Recipe:
    """Read, override, check the schema and the semantics; raise RecipeError on any problem.
    `probe_servers`: also ask every served teacher whether it can teach (HTTP requests;
    `pipeline run` asks only those of the stages it will run, `probe_teacher_servers`)."""
    recipe = read_recipe(path, overrides)
    validate(recipe, probe_servers)
    return recipe


def validate(recipe: Recipe, probe_servers: bool = False) -> None:
    problems: list[tuple[str, str]] = []
    if not recipe.stages:
        problems.append(("stages", "the recipe has no stages"))
    for name, source in recipe.sources.items():
        missing = set(missing_paths(source.__dict__))
        for i, path in enumerate(getattr(source, "paths", None) or []):
            if path in missing:
                problems.append((f"sources.{name}.paths[{i}]", f"{path} does not exist"))
    for name, cfg in recipe.stages.items():
        problems += _check_stage(recipe, name, cfg)
    if not problems:
        # Cycles only make sense to look for once every edge points at a real stage.
        topo_order({n: sorted(set(stage_refs(c).values()) | set(c.after))
                    for n, c in recipe.stages.items()})
        problems += memory_problems(recipe)  # per-GPU memory against launcher.gpu_memory_gb
        if probe_servers:
            problems += probe_teacher_servers(recipe)
    if problems:
        raise RecipeError(problems)


def _check_stage(recipe: Recipe, name: str, cfg) -> list[tuple[str, str]]:
    path = f"stages.{name}"
    problems = []
    known = ", ".join(recipe.stages)
    for key, dep in stage_refs(cfg).items():
        if dep not in recipe.stages:
            problems.append((f"{path}.{key}", f"{dep!r} is not a stage of this recipe ({known})"))
        elif recipe.stages[dep].kind not in (allowed := REF_KINDS.get((cfg.kind, key))
                                             or REF_KINDS.get(key) or (recipe.stages[dep].kind,)):
            problems.append((f"{path}.{key}", f"{dep!r} is a {recipe.stages[dep].kind} stage; "
                                              f"expected a {' or '.join(allowed)} stage"))
        elif dep == name:
            problems.append((f"{path}.{key}", "a stage cannot depend on itself"))
    for i, dep in enumerate(cfg.after):
        if dep not in recipe.stages:
            problems.append((f"{path}.after[{i}]", f"{dep!r} is not a stage of this recipe ({known})"))
    for i, source in enumerate(getattr(cfg, "sources", None) or []):
        if not isinstance(source, str) or source not in recipe.sources:
            problems.append((f"{path}.sources[{i}]", f"{source!r} is not a source of this recipe "
                                                     f"({', '.join(recipe.sources) or 'none'})"))
    for key, resolve in (("model", stage_model), ("launcher", stage_launcher)):
        try:
            resolve(recipe, cfg)
        except OmegaConfBaseException as e:
            sub = getattr(e, "full_key", "")
            problems.append((f"{path}.{key}" + (f".{sub}" if sub else ""), str(e).splitlines()[0]))
        except ValueError as e:  # the dataclass's own __post_init__ check, worded "key: problem"
            sub, _, msg = str(e).partition(": ")
            problems.append((f"{path}.{key}.{sub}", msg) if msg else (f"{path}.{key}", str(e)))
    if problems:
        return problems
    if isinstance(cfg, ImportConfig):
        problems += _check_import(path, cfg)
    if isinstance(cfg, ExportConfig):
        problems += [(f"{path}.{key}", msg)
                     for key, msg in export_problems(cfg, stage_model(recipe, cfg))]
    problems += _check_imported_model(recipe, path, cfg)
    if isinstance(cfg, PretrainConfig):
        problems += _check_pretrain(recipe, path, cfg)
    if isinstance(cfg, DistillConfig):
        problems += _check_distill(recipe, path, cfg)
    if isinstance(cfg, SFTConfig):
        problems += _check_sft_mix(recipe, path, cfg)
    if isinstance(cfg, PostNASConfig) and cfg.keep_full >= stage_model(recipe, cfg).num_layers:
        problems.append((f"{path}.keep_full", f"{cfg.keep_full}, must be below the model's "
                                              f"{stage_model(recipe, cfg).num_layers} layers"))
    if isinstance(cfg, SFTTokenizeConfig) and not cfg.datasets:
        problems.append((f"{path}.datasets", "name at least one conversation dataset (name, "
                                             "source, format)"))
    if isinstance(cfg, RLConfig) and not cfg.substages:
        problems.append((f"{path}.substages", "name at least one sub-stage (name, prompts, "
                                              "reward, filter, grpo)"))
    return problems


def tokenizer_of(recipe: Recipe, stage: str) -> str | None:
    """The tokenizer stage a checkpoint stage was trained with (an import stage is its own)."""
    cfg = recipe.stages[stage]
    return stage if isinstance(cfg, ImportConfig) else getattr(cfg, "tokenizer", None)


def _check_distill(recipe: Recipe, path: str, cfg: DistillConfig) -> list[tuple[str, str]]:
    """Teacher and student must share a tokenizer: the teacher's must be the distill stage's
    `teacher_tokenizer` (compared token by token at run time) or else its `tokenizer`."""
    problems = []
    want = cfg.teacher_tokenizer or cfg.tokenizer
    served = isinstance(cfg.teacher, TeacherServerConfig)  # its tokenizer is probed, not named
    for role, key in [(cfg.teacher, "teacher")] * (not served) + [(cfg.student, "student")]:
        used = tokenizer_of(recipe, role)
        expected = want if key == "teacher" else cfg.tokenizer
        if used and used != expected:
            fix = ("set teacher_tokenizer: " + repr(used) + " (checked token by token before any "
                   "work)") if key == "teacher" else "use the student's own tokenizer"
            problems.append((f"{path}.{key}", f"{role!r} was trained with tokenizer {used!r}, "
                                              f"not {expected!r}; {fix}"))
    return problems


def probe_teacher_servers(recipe: Recipe, only: set[str] | None = None) -> list[tuple[str, str]]:
    """Each served distill teacher (of the stages in `only`, if given), before anything starts:
    reachable, serving its model, and tokenizing a probe text as the student's tokenizer does when
    that tokenizer exists already (a finished tokenizer or import stage, or an adopted
    model_file); otherwise the job makes the same check before any work."""
    served = {n: c for n, c in recipe.stages.items()
              if isinstance(c, DistillConfig) and isinstance(c.teacher, TeacherServerConfig)
              and (only is None or n in only)}
    graph = build_graph(recipe) if served else {}
    problems = []
    for name, cfg in served.items():
        tok = None
        manifest = graph[cfg.tokenizer].output_dir / MANIFEST
        try:
            if manifest.exists():
                tok = load_tokenizer(read_json(manifest))
            elif isinstance(adopted := recipe.stages[cfg.tokenizer], TokenizerConfig) and \
                    adopted.model_file:
                tok = SentencePieceTokenizer(adopted.model_file)
        except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported by its own stage
            tok = None
        why = TeacherServer(cfg.teacher, timeout_s=10.0, max_retries=0).problem(tok)
        if why:
            problems.append((f"stages.{name}.teacher" + (f".{why[0]}" if why[0] else ""), why[1]))
    return problems


def _check_sft_mix(recipe: Recipe, path: str, cfg: SFTConfig) -> list[tuple[str, str]]:
    """`mix` names datasets of `data`/`more_data`: an sft_tokenize stage's datasets, or an sft_data
    stage's own name."""
    names = []
    for dep in filter(None, (cfg.data, cfg.more_data)):
        upstream = recipe.stages.get(dep)
        names += [d.name for d in upstream.datasets] if hasattr(upstream, "datasets") else [dep]
    return [(f"{path}.mix.{name}", f"not a dataset of data/more_data ({', '.join(names)})")
            for name in cfg.mix if name not in names]


def _check_import(path: str, cfg: ImportConfig) -> list[tuple[str, str]]:
    """The HF directory exists and holds a model we convert exactly (read: config.json only)."""
    config = Path(cfg.path) / "config.json"
    if not config.is_file():
        return [(f"{path}.path", f"{config} does not exist (a Hugging Face model directory)")]
    try:
        read_hf_config(cfg.path)
    except (UnsupportedModel, KeyError, ValueError) as e:
        return [(f"{path}.path", f"{config}: {e}")]
    return []


def _check_imported_model(recipe: Recipe, path: str, cfg) -> list[tuple[str, str]]:
    """A stage that starts from an import stage's weights must describe the same architecture."""
    dep = getattr(cfg, "init", None)
    model = stage_model(recipe, cfg)
    upstream = recipe.stages.get(dep) if dep else None
    if model is None or not isinstance(upstream, ImportConfig):
        return []
    config = Path(upstream.path) / "config.json"
    try:
        imported, _ = read_hf_config(upstream.path)
    except Exception:  # noqa: BLE001 - reported on the import stage itself
        return []
    key = f"{path}.model" if cfg.model else "model"
    return [(key, f"does not match the {dep!r} checkpoint ({config}): {diff}")
            for diff in architecture_mismatch(model, imported)]


def _check_pretrain(recipe: Recipe, path: str, cfg: PretrainConfig) -> list[tuple[str, str]]:
    problems = []
    model = stage_model(recipe, cfg)
    model_key = f"{path}.model" if cfg.model else "model"
    if model.hidden_size % model.num_attention_heads:
        problems.append((f"{model_key}.num_attention_heads", f"{model.num_attention_heads} does not "
                                                             f"divide hidden_size {model.hidden_size}"))
    if model.num_attention_heads % model.num_query_groups:
        problems.append((f"{model_key}.num_query_groups", f"{model.num_query_groups} does not divide "
                                                          f"num_attention_heads {model.num_attention_heads}"))
    batches = [(f"{path}.global_batch_size", cfg.global_batch_size)] + [
        (f"{path}.phases[{i}].global_batch_size", p.global_batch_size)
        for i, p in enumerate(cfg.phases) if p.global_batch_size]
    if cfg.micro_batch_size < 1:
        problems.append((f"{path}.micro_batch_size", f"{cfg.micro_batch_size}, must be at least 1"))
        batches = []
    for key, gbs in batches:
        if gbs < 1:
            problems.append((key, f"{gbs}, must be at least 1"))
        elif gbs % cfg.micro_batch_size:
            problems.append((key, f"{gbs} is not a multiple of micro_batch_size {cfg.micro_batch_size}"))
    if not cfg.phases:
        problems.append((f"{path}.phases", "give at least one phase (name, tokens, mixture)"))
    data_sources = set(recipe.stages[cfg.data].sources)
    for i, phase in enumerate(cfg.phases):
        key = f"{path}.phases[{i}].mixture"
        why = check_weights(dict(phase.mixture))
        if why:
            problems.append((key, why))
        for source in phase.mixture:
            if source not in data_sources:
                problems.append((f"{key}.{source}", f"not a source of stage {cfg.data!r} (it "
                                                    f"prepares {', '.join(sorted(data_sources))})"))
    if problems:
        return problems
    schedule = pretrain_schedule(cfg, model)
    specs = phase_specs(cfg, model)
    return [(f"{path}.{key}", msg) for key, msg in
            check_schedule(schedule, specs, float(cfg.lr.warmup_tokens), float(cfg.lr.decay_tokens))]

