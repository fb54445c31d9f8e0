"""The stage graph: edges from reference fields, content hashes, output dirs, stage specs.

A stage's hash covers its kind, its config (minus `unhashed` fields), the model and sources it
reads, and the hashes of the stages it references — never its name or our code (Marin's rule:
refactors must not invalidate finished work). Its output dir is `<workdir>/<name>-<hash8>`, so a
changed stage and everything downstream get new dirs, while upstream dirs are reused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.recipe import Recipe, RecipeError
from launch.config import LaunchConfig
from stages.configs.model import ModelConfig
from data_recipes.config_fields import hash_view, ref_fields, unhashed_fields
from data_recipes.sources import build_source
from stages.contract import StageSpec

HASH_LEN = 8


@dataclass
class StageNode:
    name: str
    kind: str
    config: Any
    """The kind's config dataclass, as validated."""
    refs: dict[str, str]
    """Reference field -> upstream stage name."""
    after: list[str]
    model: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)
    hash: str = ""
    output_dir: Path = Path()

    @property
    def deps(self) -> list[str]:
        return sorted(set(self.refs.values()) | set(self.after))


def stage_model(recipe: Recipe, cfg: Any) -> ModelConfig | None:
    """The recipe's model with the stage's `model:` overrides, or None for kinds without one."""
    return _override(recipe.model, cfg.model) if hasattr(cfg, "model") else None


def stage_launcher(recipe: Recipe, cfg: Any) -> LaunchConfig:
    """The recipe's launcher with the stage's `launcher:` overrides."""
    return _override(recipe.launcher, getattr(cfg, "launcher", None))


def _override(base: Any, overrides: dict[str, Any] | None) -> Any:
    """A copy of dataclass `base` with `overrides` merged in (unknown keys raise OmegaConf errors)."""
    if not overrides:  # most stages: skip OmegaConf's round trip
        return copy.deepcopy(base)
    key = (type(base), repr(base), repr(overrides))  # dataclass reprs show every field
    if key not in _merged:  # a plan asks for each stage's launcher and model several times
        _merged[key] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), overrides))
    return copy.deepcopy(_merged[key])


# A merge is ~30 ms; a plan of the flagship made ~60 of them, a third of its 2 s.
_merged: dict[tuple, Any] = {}


def stage_refs(cfg: Any) -> dict[str, str]:
    """Reference field -> the stage it names. A field that holds something else (distill's
    teacher behind an HTTP server) is no edge: it is hashed as its content."""
    return {f: getattr(cfg, f) for f in ref_fields(type(cfg)) if isinstance(getattr(cfg, f), str)}


def topo_order(deps: dict[str, list[str]]) -> list[str]:
    """Stages ordered so that every stage comes after its dependencies (recipe order otherwise).

    Raises RecipeError naming the cycle if there is one.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = trail[trail.index(name):] + [name]
            raise RecipeError([(f"stages.{cycle[0]}", "dependency cycle: " + " -> ".join(cycle))])
        state[name] = "visiting"
        for dep in deps[name]:
            visit(dep, trail + [name])
        state[name] = "done"
        order.append(name)

    for name in deps:
        visit(name, [])
    return order


def build_graph(recipe: Recipe) -> dict[str, StageNode]:
    """All stages in dependency order, hashed and placed. The recipe must be validated."""
    nodes: dict[str, StageNode] = {}
    for name, cfg in recipe.stages.items():
        model = stage_model(recipe, cfg)
        used = getattr(cfg, "sources", None) or []
        nodes[name] = StageNode(
            name=name, kind=cfg.kind, config=cfg, refs=stage_refs(cfg), after=list(cfg.after),
            model=dataclasses.asdict(model) if model else {},
            sources={s: dataclasses.asdict(recipe.sources[s]) for s in used},
            launcher=stage_launcher(recipe, cfg))
    order = topo_order({n: node.deps for n, node in nodes.items()})
    workdir = Path(recipe.workdir)
    for name in order:
        node = nodes[name]
        node.hash = stage_hash(node, {dep: nodes[dep].hash for dep in node.refs.values()})
        node.output_dir = workdir / f"{name}-{node.hash[:HASH_LEN]}"
    return {name: nodes[name] for name in order}


def stage_hash(node: StageNode, upstream: dict[str, str]) -> str:
    config = hash_view(node.config)  # added options left at their defaults stay out
    for key in unhashed_fields(type(node.config)) + ["after"]:
        config.pop(key, None)
    for key, dep in node.refs.items():
        config[key] = upstream[dep]  # an edge hashes as the upstream's content, not its name
    model = hash_view(ModelConfig(**node.model)) if node.model else {}  # added model fields too
    sources = {name: hash_view(build_source(s)) for name, s in node.sources.items()}
    blob = json.dumps({"kind": node.kind, "config": config, "model": model,
                       "sources": sources}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def make_spec(node: StageNode, graph: dict[str, StageNode], tracking_uri: str = "",
              run_id: str = "") -> StageSpec:
    return StageSpec(
        name=node.name, kind=node.kind, config=dataclasses.asdict(node.config),
        output_dir=str(node.output_dir.resolve()),
        inputs={key: str(graph[dep].output_dir.resolve()) for key, dep in node.refs.items()},
        model=node.model, sources=node.sources, tracking_uri=tracking_uri, run_id=run_id,
        hash=node.hash)



def select_stages(graph: dict[str, StageNode], only: list[str] | None = None,
                  until: str | None = None) -> dict[str, StageNode]:
    """The part of the graph a run asks for, in graph order.

    `only`: those stages and every stage they need (transitively). `until`: every stage up to and
    including it in graph order (its upstreams among them). Both: the stages in both selections.
    Unknown names raise RecipeError naming the flag."""
    unknown = [n for n in (only or []) + ([until] if until else []) if n not in graph]
    if unknown:
        flag = "--until" if until in unknown else "--only"
        raise RecipeError([(flag, f"no stage named {unknown[0]!r}; stages: {', '.join(graph)}")])
    keep = set(graph)
    if only:
        needed: set[str] = set()
        todo = list(only)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(graph[name].deps)
        keep &= needed
    if until:
        names = list(graph)
        keep &= set(names[:names.index(until) + 1])
    return {name: node for name, node in graph.items() if name in keep}
