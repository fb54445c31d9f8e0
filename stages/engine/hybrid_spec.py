"""Per-layer specs of hybrid GPTModels for stages.engine.model: megatron's attention where a layer
is `full`, the linear-attention JetBlock where it is `linear`, and for postnas's super-network a
`super` layer: megatron's SelfAttention with the linear block beside it (`self_attention.linear.*`),
so a base model's checkpoint keys are the super-network's minus those. Every layer comes from
megatron's local (pure megatron-core) layer spec, so full layers have the keys of a base model built
without TransformerEngine.
"""

from __future__ import annotations

import dataclasses

from stages.engine.linear_attention import JetBlock

SUPER = "super"


def _super_attention_class():
    from megatron.core.transformer.attention import SelfAttention

    class SuperAttention(SelfAttention):
        """A layer's own attention plus a linear block initialised from it; `path` says which
        one runs (postnas samples it per step). Never give it to the KV-cache generator: that
        path would read it as plain attention whatever `path` says."""

        def __init__(self, config, submodules, layer_number, **kwargs):
            super().__init__(config, submodules, layer_number, **kwargs)
            self.linear = JetBlock(config, layer_number)
            self.path = "full"

        def forward(self, hidden_states, attention_mask=None, **kwargs):
            if self.path == "linear":
                return self.linear(hidden_states, attention_mask,
                                   inference_context=kwargs.get("inference_context"))
            return super().forward(hidden_states, attention_mask, **kwargs)

    return SuperAttention


_SUPER_ATTENTION = None


def super_attention_class():
    global _SUPER_ATTENTION
    if _SUPER_ATTENTION is None:  # megatron is imported only when a model is built
        _SUPER_ATTENTION = _super_attention_class()
    return _SUPER_ATTENTION


def hybrid_block_spec(kinds: list[str], qk_layernorm: bool = False):
    """megatron's TransformerBlockSubmodules with one layer spec per entry of `kinds` (full,
    linear or super), all from the local spec, and its final norm."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (LayerNormImpl,
                                                             TransformerBlockSubmodules)

    local = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm,
                                                     normalization="RMSNorm")
    attention = local.submodules.self_attention
    mixers = {"full": attention, "linear": ModuleSpec(module=JetBlock),
              SUPER: dataclasses.replace(attention, module=super_attention_class())}
    specs = []
    for i, kind in enumerate(kinds):
        if kind not in mixers:
            raise ValueError(f"layout[{i}]: {kind!r} is not a layer kind; one of "
                             f"{', '.join(mixers)}")
        specs.append(dataclasses.replace(local, submodules=dataclasses.replace(
            local.submodules, self_attention=mixers[kind])))
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LayerNormImpl)
