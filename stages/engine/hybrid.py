"""Hybrid GPTModels: a different attention per layer (megatron's softmax attention, or the
linear-attention JetBlock), and postnas's super-network, whose layers hold both.

    build_model(cfg, vocab, seq)                      # cfg.layout = ["linear", "full", ...]
    build_model(cfg, vocab, seq, layout=["super"] * cfg.num_layers)   # the super-network
    set_paths(supernet, ["full", "linear", ...])       # the sub-network the next forward runs
    hybrid_state_dict(supernet.state_dict(), layout)   # -> loads into the hybrid of that layout

The layer specs are in stages.engine.hybrid_spec (stages.engine.model builds with them).
"""

from __future__ import annotations

import re

from stages.engine.hybrid_spec import SUPER
from stages.engine.model import unwrap

__all__ = ["SUPER", "base_into_super", "hybrid_state_dict", "init_linear_from_attention",
           "set_paths", "super_layers"]


def super_layers(model) -> list:
    return [layer.self_attention for layer in unwrap(model).decoder.layers]


def set_paths(model, paths: list[str]) -> None:
    """Choose each super layer's path (`full` or `linear`) for the following forwards."""
    for attention, path in zip(super_layers(model), paths, strict=True):
        attention.path = path


def init_linear_from_attention(model) -> None:
    """Every super layer's linear block takes its q, k, v and output projections from the
    layer's attention (call after loading the base weights)."""
    for attention in super_layers(model):
        attention.linear.init_from_attention(attention)


def base_into_super(base_state: dict, model) -> None:
    """Load a full-attention model's state dict into the super-network (everything but the
    linear blocks, which must be all that is missing), then initialise the linear blocks."""
    missing, unexpected = unwrap(model).load_state_dict(base_state, strict=False)
    stray = [k for k in missing if ".self_attention.linear." not in k]
    if stray or unexpected:
        raise ValueError(f"base checkpoint does not fit the super-network: missing {stray[:3]}, "
                         f"unexpected {unexpected[:3]}")
    init_linear_from_attention(model)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.self_attention\.(.*)$")


def hybrid_state_dict(super_state: dict, layout: list[str]) -> dict:
    """The state dict of the hybrid of `layout` taken from a super-network's: a full layer keeps
    its attention, a linear layer's block moves up to `self_attention.*`."""
    out = {}
    for key, value in super_state.items():
        m = _LAYER.match(key)
        if m is None:
            out[key] = value
            continue
        layer, rest = int(m.group(1)), m.group(2)
        is_linear = rest.startswith("linear.")
        if layout[layer] == "full" and not is_linear:
            out[key] = value
        elif layout[layer] == "linear" and is_linear:
            out[f"decoder.layers.{layer}.self_attention.{rest[len('linear.'):]}"] = value
    return out
