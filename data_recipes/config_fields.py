"""The markers every recipe config uses, the stages' and the data recipes' alike.

They sit here, at the bottom of the import graph, because `data_recipes` may not import `stages`
and its own configs (prompt sets, generators, rewards, pair filters) need them too.

Fields marked `ref()` name another stage of the recipe; they are the DAG's edges (as in Marin's
executor, nobody writes edges by hand). Fields marked `unhashed()` change how a stage runs but not
what it produces, so they stay out of the stage's content hash.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field, fields
from typing import Any

MISSING: Any = "???"  # OmegaConf's marker for a value the recipe must give


def ref(default: Any = MISSING) -> Any:
    """A field that names an upstream stage (an edge of the DAG)."""
    return field(default=default, metadata={"ref": True})


def unhashed(default: Any = None) -> Any:
    """A field that does not change a stage's outputs (logging cadence, process count, ...)."""
    return field(default=default, metadata={"unhashed": True})


def added(default: Any = None, *, factory: Any = None) -> Any:
    """A field added after recipes have run: it stays out of a stage's hash while it holds its
    default (`hash_view`), so a new option does not rerun every finished stage."""
    if factory is not None:
        return field(default_factory=factory, metadata={"added": True})
    return field(default=default, metadata={"added": True})


def hash_view(config: Any) -> Any:
    """dataclasses.asdict, less the `added` fields (at any depth) that hold their defaults."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        out = {}
        for f in fields(config):
            value = getattr(config, f.name)
            if f.metadata.get("added") and value == (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING
                    else f.default):
                continue
            out[f.name] = hash_view(value)
        return out
    if isinstance(config, (list, tuple)):
        return type(config)(hash_view(x) for x in config)
    if isinstance(config, dict):
        return {k: hash_view(v) for k, v in config.items()}
    return copy.deepcopy(config)


def ref_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("ref")]


def unhashed_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("unhashed")]


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A config dataclass back from a dict (a stage job's spec; nested dataclasses included)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))
