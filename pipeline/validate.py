"""Semantic checks of a schema-valid recipe, run before anything starts.

Each problem is `(key path, message)`; all of them are collected and raised together as a
RecipeError, so a user fixes a recipe in one round.
"""

from __future__ import annotations

from omegaconf.errors import OmegaConfBaseException

from data_recipes.sources import missing_paths
from pipeline.graph import stage_launcher, stage_model, stage_refs, topo_order
from pipeline.recipe import Recipe, RecipeError
from schedulers.fg_wsd import check as check_schedule
from schedulers.mixture import check_weights
from stages.config import PretrainConfig, phase_specs, pretrain_schedule

# Which kind each reference field must point at (kinds not listed may point anywhere).
REF_KINDS = {"tokenizer": ("tokenizer",), "data": ("prepare",)}


def validate(recipe: Recipe) -> None:
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
    if problems:
        raise RecipeError(problems)


def _check_stage(recipe: Recipe, name: str, cfg) -> list[tuple[str, str]]:
    path = f"stages.{name}"
    problems = []
    known = ", ".join(recipe.stages)
    for key, dep in stage_refs(cfg).items():
        if dep not in recipe.stages:
            problems.append((f"{path}.{key}", f"{dep!r} is not a stage of this recipe ({known})"))
        elif key in REF_KINDS and recipe.stages[dep].kind not in REF_KINDS[key]:
            problems.append((f"{path}.{key}", f"{dep!r} is a {recipe.stages[dep].kind} stage; "
                                              f"expected a {' or '.join(REF_KINDS[key])} stage"))
        elif dep == name:
            problems.append((f"{path}.{key}", "a stage cannot depend on itself"))
    for i, dep in enumerate(cfg.after):
        if dep not in recipe.stages:
            problems.append((f"{path}.after[{i}]", f"{dep!r} is not a stage of this recipe ({known})"))
    for i, source in enumerate(getattr(cfg, "sources", None) or []):
        if source not in recipe.sources:
            problems.append((f"{path}.sources[{i}]", f"{source!r} is not a source of this recipe "
                                                     f"({', '.join(recipe.sources) or 'none'})"))
    for key, resolve in (("model", stage_model), ("launcher", stage_launcher)):
        try:
            resolve(recipe, cfg)
        except OmegaConfBaseException as e:
            sub = getattr(e, "full_key", "")
            problems.append((f"{path}.{key}" + (f".{sub}" if sub else ""), str(e).splitlines()[0]))
    if problems:
        return problems
    if isinstance(cfg, PretrainConfig):
        problems += _check_pretrain(recipe, path, cfg)
    return problems


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
    for key, gbs in batches:
        if gbs % cfg.micro_batch_size:
            problems.append((key, f"{gbs} is not a multiple of micro_batch_size {cfg.micro_batch_size}"))
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

