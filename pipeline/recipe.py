"""The recipe: a YAML file + dotlist overrides, checked against dataclass schemas.

    recipe = read_recipe("recipes/tiny.yaml", ["stages.pretrain.phases.2.tokens=65536"])

The top level is `Recipe`; each source is checked against its kind's dataclass
(`data_recipes.sources.SOURCE_KINDS`), each stage against its kind's (`stages.configs.STAGE_KINDS`).
Every problem is reported as `RecipeError` lines `<key.path>: <what is wrong>`; the CLI prints
them and exits with 2 before anything starts. Semantic checks live in `pipeline.validate`, whose
`load_recipe` (read + validate) is the entry point the CLI and the tests use.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_recipes.sources import SOURCE_KINDS
from data_recipes.config_fields import MISSING, ref_fields
from stages.configs import STAGE_KINDS
from stages.configs.rl import RLConfig
from launch.config import LaunchConfig
from stages.configs.model import ModelConfig


class RecipeError(Exception):
    """One or more problems with a recipe, each `(key path, message)`."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{k}: {m}" if k else m for k, m in problems))


@dataclass
class TrackingConfig:
    uri: Optional[str] = None
    """MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db."""
    experiment: Optional[str] = None
    """MLflow experiment name. Default: the recipe name."""


@dataclass
class PlanConfig:
    """Assumptions of `pipeline plan`'s cost estimate."""

    mfu: float = 0.4
    """Model FLOPs utilisation assumed for the GPU-hours estimate."""
    gpu_peak_tflops: float = 989.0
    """Dense bf16 peak of one GPU (H100 SXM: 989)."""
    rollout_tokens_per_gpu_s: float = 5000.0
    """Generated tokens per second per GPU (rollouts, DPD sampling, eval): batched decoding of a
    ~3B model on one H100 with an inference engine; measure yours (bench/gpu_check.py)."""
    answer_fraction: float = 0.5
    """The mean answer length as a share of `max_new_tokens`."""
    sft_tokens_per_sample: int = 2048
    """Mean tokens of an SFT conversation (prompt + answer)."""
    sft_dataset_samples: int = 1_000_000
    """Records assumed for a conversation dataset whose size the recipe does not cap (max_docs)."""
    fused_attention: Optional[bool] = None
    """Whether the jobs will have TransformerEngine's fused attention (no s x s scores kept), for
    the memory plan. None: as where `pipeline plan` runs (TransformerEngine importable or not)."""

    def __post_init__(self):
        for key in ("mfu", "gpu_peak_tflops", "rollout_tokens_per_gpu_s", "answer_fraction",
                    "sft_tokens_per_sample", "sft_dataset_samples"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: {getattr(self, key)}, must be positive")
        for key in ("mfu", "answer_fraction"):
            if getattr(self, key) > 1:
                raise ValueError(f"{key}: {getattr(self, key)}, a share: at most 1")


@dataclass
class Recipe:
    name: str = MISSING
    workdir: str = MISSING
    """Where every stage's output dir, the MLflow store and the run lock live."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)
    """Default launcher of every stage; a stage's own `launcher:` overrides fields of it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Default model of every training stage; a stage's `model:` overrides fields of it."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    sources: dict[str, Any] = field(default_factory=dict)
    """name -> a data source (`kind:` one of data_recipes.sources.SOURCE_KINDS)."""
    stages: dict[str, Any] = field(default_factory=dict)
    """name -> a stage (`kind:` one of stages.configs.STAGE_KINDS)."""


# --------------------------------------------------------------------------------------------
# Loading


def read_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and check the schema (not the semantics: `pipeline.validate.load_recipe`);
    raise RecipeError on any problem."""
    raw = _read_yaml(path)
    for item in overrides or []:
        _apply_override(raw, item)
    _resolve(raw)
    recipe = conform(raw)
    _absolute_paths(recipe, Path.cwd())
    return recipe


def _absolute_paths(recipe: Recipe, base: Path) -> None:
    """Relative workdir and source paths are taken from the current directory, once, here, so the
    jobs (which run in their own dirs, maybe on other nodes) and the hashes see absolute paths."""
    recipe.workdir = str((base / os.path.expanduser(recipe.workdir)).resolve())
    for source in recipe.sources.values():
        if hasattr(source, "paths"):
            source.paths = [str((base / os.path.expanduser(p)).resolve()) for p in source.paths]


def _read_yaml(path: str | os.PathLike, seen: tuple[Path, ...] = ()) -> DictConfig:
    """The recipe file as OmegaConf, with its `base:` chain merged under it.

    `base: other.yaml` (relative to this file) makes this file a set of overrides of that recipe:
    mappings merge key by key, lists and scalars replace, and a mapping with another `kind:` (a
    source that becomes a local file) replaces the base's mapping whole. Interpolations (`${oc.env:VAR}`) are
    resolved later, against the merged recipe."""
    if not Path(path).is_file():
        raise RecipeError([("", f"recipe file {path} does not exist")])
    try:
        raw = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise RecipeError([("", f"{path}: not valid YAML: {' '.join(str(e).split())}")]) from None
    if not isinstance(raw, DictConfig):
        raise RecipeError([("", f"{path}: a recipe is a mapping of keys, got a list")])
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError([("base", f"must be the path of a recipe file, got {_shown(base)}")])
    base_path = (Path(path).parent / base).resolve()
    if base_path in seen + (Path(path).resolve(),):
        raise RecipeError([("base", f"{base} is already in this recipe's base chain (a cycle)")])
    if not base_path.is_file():
        raise RecipeError([("base", f"base recipe {base_path} does not exist")])
    base_raw = _read_yaml(base_path, seen + (Path(path).resolve(),))
    _drop_replaced(base_raw, raw)
    try:
        return OmegaConf.merge(base_raw, raw)
    except OmegaConfBaseException as e:
        raise RecipeError([(_key_of(e), f"cannot override the base recipe: {_reason(e)}")]) from None


def _drop_replaced(base: DictConfig, child: DictConfig) -> None:
    """Delete from `base` what `child` replaces rather than overrides: a mapping whose `kind`
    differs, or a value whose shape (mapping or not) differs."""
    for key in child.keys():
        if key not in base:
            continue
        old, new = base._get_node(key), child._get_node(key)
        if isinstance(old, DictConfig) != isinstance(new, DictConfig):
            del base[key]
        elif isinstance(new, DictConfig):
            if "kind" in new and new.get("kind") != old.get("kind"):
                del base[key]
            else:
                _drop_replaced(old, new)


def _resolve(raw: DictConfig) -> None:
    """Resolve every interpolation in place, reporting each that fails by its key: a recipe says
    `url: ${oc.env:TEACHER_URL}` where the user must supply a value. One line per unset variable,
    naming the first key that uses it (and the others)."""
    failed: dict[str, list[str]] = {}  # reason -> the keys it stops

    def walk(node: DictConfig | ListConfig, path: str) -> None:
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            key_path = f"{path}[{key}]" if isinstance(node, ListConfig) else _join(path, str(key))
            if OmegaConf.is_interpolation(node, key):
                try:
                    node[key]
                except OmegaConfBaseException as e:
                    failed.setdefault(_interpolation_reason(e), []).append(key_path)
                continue
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                walk(child, key_path)

    walk(raw, "")
    if failed:
        raise RecipeError([(keys[0], reason + (f"; also used by {', '.join(keys[1:])}"
                                               if keys[1:] else ""))
                           for reason, keys in failed.items()])
    OmegaConf.resolve(raw)


def _interpolation_reason(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    if "Environment variable '" in msg:
        var = msg.split("Environment variable '", 1)[1].split("'", 1)[0]
        return f"environment variable {var} is not set (export {var}=...)"
    return f"cannot resolve: {msg}"


def _apply_override(raw: DictConfig, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError([("", f"override {item!r} is not key=value (e.g. stages.pretrain.seed=2)")])
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]  # YAML typing
    try:
        OmegaConf.update(raw, key, parsed, merge=True)
    except OmegaConfBaseException as e:
        raise RecipeError([(key, f"cannot override: {_reason(e)}")]) from None


def conform(raw: DictConfig) -> Recipe:
    """Check `raw` against the schemas; return a Recipe whose sources/stages are dataclasses."""
    problems: list[tuple[str, str]] = []
    top = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k not in ("sources", "stages")])
    recipe = _structured(Recipe, top, "", problems)
    for section, kinds in (("sources", SOURCE_KINDS), ("stages", STAGE_KINDS)):
        node = raw.get(section)
        if node is None:
            continue
        if not isinstance(node, DictConfig):
            problems.append((section, "must be a mapping of name -> {kind: ..., ...}"))
            continue
        items = {}
        for name, item in node.items():
            path = f"{section}.{name}"
            kind = item.get("kind") if isinstance(item, DictConfig) else None
            if not isinstance(kind, str) or kind not in kinds:
                problems.append((f"{path}.kind", f"{kind!r} is not a {section[:-1]} kind; one of "
                                                 f"{', '.join(sorted(kinds))}"))
                continue
            items[str(name)] = _structured(kinds[kind], item, path, problems)
        if section == "stages" and not problems:
            items = expand_substages(items)
        if recipe is not None:
            setattr(recipe, section, items)
    if problems or recipe is None:
        raise RecipeError(problems)
    return recipe


def expand_substages(stages: dict[str, Any]) -> dict[str, Any]:
    """Each `rl` stage with sub-stages [a, b, c] becomes stages `name.a`, `name.b`, `name.c` (one
    sub-stage each, each starting from the previous one's checkpoint), so every sub-stage is its
    own resumable node with its own hash: a crash in `b` never reruns `a`. A reference to `name`
    from another stage means its last sub-stage."""
    out: dict[str, Any] = {}
    last: dict[str, str] = {}
    for name, cfg in stages.items():
        if not isinstance(cfg, RLConfig) or not cfg.substages:
            out[name] = cfg  # (an rl stage without sub-stages is reported by validation)
            continue
        init = cfg.init
        for sub in cfg.substages:
            out[f"{name}.{sub.name}"] = dataclasses.replace(cfg, init=init, substages=[sub])
            init = f"{name}.{sub.name}"
        last[name] = init
    for cfg in out.values():
        for key in ref_fields(type(cfg)):
            if getattr(cfg, key) in last:
                setattr(cfg, key, last[getattr(cfg, key)])
        cfg.after = [last.get(dep, dep) for dep in cfg.after]
    return out


def _structured(cls: type, node: Any, path: str, problems: list) -> Any:
    """`node` checked against dataclass `cls` by OmegaConf, with full key paths in errors.

    OmegaConf reports keys inside list items relative to the item, so list-of-dataclass fields
    are checked item by item here (and get `phases[2].tokens`-style paths).
    """
    if not isinstance(node, DictConfig):
        problems.append((path, f"must be a mapping, got {_shown(node)}"))
        return None
    hints = typing.get_type_hints(cls)
    node = node.copy()
    items: dict[str, list] = {}
    failed = False
    for f in dataclasses.fields(cls):
        hint, value = _unless_none(hints[f.name]), node.get(f.name)
        elem = _list_item_dataclass(hint)
        if value is not None and ((elem is not None and not isinstance(value, ListConfig)) or (
                dataclasses.is_dataclass(hint) and not isinstance(value, DictConfig))):
            problems.append((_join(path, f.name), f"must be a {'list' if elem else 'mapping'}, "
                                                  f"got {_shown(value)}"))
            failed = True
        elif _list_of_plain(hint) and isinstance(value, ListConfig) and any(
                isinstance(x, (DictConfig, ListConfig)) for x in value):
            i = next(i for i, x in enumerate(value) if isinstance(x, (DictConfig, ListConfig)))
            problems.append((f"{_join(path, f.name)}[{i}]", f"must be a {_list_of_plain(hint)}, "
                                                             f"got {_shown(value[i])}"))
            failed = True
        elif elem is not None and isinstance(value, ListConfig):
            items[f.name] = [_structured(elem, x, f"{_join(path, f.name)}[{i}]", problems)
                             for i, x in enumerate(value)]
            failed |= any(x is None for x in items[f.name])  # reported with its own path
            del node[f.name]
        elif dataclasses.is_dataclass(hint) and isinstance(value, DictConfig):
            # checked on its own first, so its errors carry its path; merged below as it is
            if _structured(hint, value, _join(path, f.name), problems) is None:
                failed = True
    if failed:
        return None
    try:
        cfg = OmegaConf.merge(_schema(cls), node)
        obj = OmegaConf.to_object(cfg)
        if items:
            for name, values in items.items():
                setattr(obj, name, values)
            if hasattr(obj, "__post_init__"):  # again, now with the nested values in place
                obj.__post_init__()
    except OmegaConfBaseException as e:
        problems.append((_join(path, _key_of(e)), _reason(e)))
        return None
    except ValueError as e:  # a dataclass's own __post_init__ check, worded "key: problem"
        key, _, msg = str(e).partition(": ")
        problems.append((_join(path, key), msg) if msg else (path, str(e)))
        return None
    except TypeError as e:  # a value of a type the check itself could not handle
        problems.append((path, f"a value has the wrong type ({e})"))
        return None
    return obj


@functools.cache
def _schema(cls: type) -> DictConfig:
    """OmegaConf's schema of dataclass `cls`, built once: a recipe checks ~200 nodes against ~20
    classes, and building a schema was half of `pipeline plan`'s time. merge() never mutates it."""
    return OmegaConf.structured(cls)


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return repr(value)


def _list_of_plain(hint: Any) -> str:
    """'str' for list[str] (likewise int, float, bool), '' for any other hint. OmegaConf lets a
    mapping or list stand as an item of such a list; the checks after it cannot take one."""
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint)
        if arg in (str, int, float, bool):
            return arg.__name__
    return ""


def _unless_none(hint: Any) -> Any:
    """Optional[X] -> X (an optional nested dataclass is checked like a required one when set)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _list_item_dataclass(hint: Any) -> type | None:
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint)
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _key_of(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", "") or "")


def _reason(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0].strip()
    if type(e).__name__ == "MissingMandatoryValue":
        return "missing value: this key must be set"
    if type(e).__name__ == "ConfigKeyError" and msg.startswith("Key '"):
        return "unknown key" + (f" ({msg.split('. ', 1)[1]})" if ". Did you mean" in msg else "")
    return msg
