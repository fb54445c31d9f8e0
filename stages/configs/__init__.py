"""Config dataclasses of the stage kinds: the single source of truth for what a recipe may say.

Torch-free on purpose: the driver (`pipeline/`) validates recipes against these classes without
importing torch or megatron, and the stage jobs rebuild the same classes from their spec. One
small module per stage family; `base` holds the fields they share.
"""

from __future__ import annotations

from stages.configs.base import NoopConfig
from stages.configs.data import PrepareConfig, SFTDataConfig, SFTTokenizeConfig, TokenizerConfig
from stages.configs.eval import EvalConfig
from stages.configs.hf import ExportConfig, ImportConfig
from stages.configs.post_training import DistillConfig, SFTConfig
from stages.configs.postnas import PostNASConfig
from stages.configs.pretrain import PretrainConfig
from stages.configs.rl import RLConfig

STAGE_KINDS: dict[str, type] = {
    "noop": NoopConfig,
    "tokenizer": TokenizerConfig,
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "sft_data": SFTDataConfig,
    "sft_tokenize": SFTTokenizeConfig,
    "sft": SFTConfig,
    "eval": EvalConfig,
    "distill": DistillConfig,
    "rl": RLConfig,
    "postnas": PostNASConfig,
    "import": ImportConfig,
    "export": ExportConfig,
}

_MODULE_OF_KIND = {"import": "hf_import", "export": "hf_export"}  # `import` is a Python keyword


def stage_module(kind: str) -> str:
    """The module a launcher runs for a stage kind (`python -m <module> --spec ...`)."""
    return f"stages.{_MODULE_OF_KIND.get(kind, kind)}"
