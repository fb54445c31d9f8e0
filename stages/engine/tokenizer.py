"""The tokenizer an upstream stage produced (a `tokenizer` stage's, or an `import` stage's own).

The stage side of data_recipes.tokenizer_loading: it reads the stage's manifest (stages.contract)
and hands it to `load_tokenizer`, so data_recipes never needs to know the stage contract.
"""

from __future__ import annotations

from pathlib import Path

from data_recipes.tokenizer_loading import Tokenizer, load_tokenizer
from stages.contract import MANIFEST, read_json


def tokenizer_of_stage(stage_dir: str | Path) -> Tokenizer:
    return load_tokenizer(read_json(Path(stage_dir) / MANIFEST))
