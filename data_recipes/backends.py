"""The generator backend a GeneratorConfig names, built: http (data_recipes.generators) or an
oracle (data_recipes.oracles). Engine backends are built by the stage, which holds the model.
"""

from __future__ import annotations

import os

from data_recipes.generators import Generator, GeneratorConfig, HTTPGenerator
from data_recipes.oracles import build_oracle


def build_generator(cfg: GeneratorConfig, cache_path: str | os.PathLike) -> Generator:
    """An http or oracle backend (engine backends are built by the stage, which holds the model)."""
    if cfg.kind == "http":
        return HTTPGenerator(cfg, cache_path)
    if cfg.kind == "oracle":
        return build_oracle(cfg)
    raise ValueError(f"kind: {cfg.kind!r} is built by the stage job (engine)")
