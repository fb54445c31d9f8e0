"""Configs of the Hugging Face stages, `import` (an HF model directory -> a pipeline checkpoint)
and `export` (a checkpoint -> an HF directory), and an HF config.json <-> our ModelConfig.

Torch-free: the driver (`pipeline.validate`, `pipeline.plan`) reads an HF config.json through
`read_hf_config` to check a recipe before anything runs. The weights' names and layouts are
stages.engine.hf.weights."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from data_recipes.config_fields import MISSING, added, ref, unhashed
from stages.configs.base import StageConfig
from stages.configs.model import ModelConfig


@dataclass(kw_only=True)
class ImportConfig(StageConfig):
    """A Hugging Face Llama/Qwen3 model directory as a pipeline checkpoint plus its tokenizer.

    Later stages use it as `init:` (weights) and `tokenizer:`. Their recipe `model:` must describe
    the same architecture: validation reads config.json and names every field that differs."""

    kind: str = "import"
    path: str = MISSING
    """The HF model directory: config.json, *.safetensors (one file or an index), tokenizer.json.
    Its contents are not hashed: put a version in the path (or `revision`) to rerun on a change."""
    revision: str = ""
    """Free text that is part of the stage hash (e.g. the hub commit the directory came from)."""
    eod_token: Optional[str] = None
    """The token that ends each document in `prepare` shards; default: the model's eos_token_id
    (a chat model's eos may be its end-of-turn token, e.g. Qwen3's <|im_end|>)."""

    def __post_init__(self):
        if self.path != MISSING:  # like source paths: relative to where the recipe is loaded
            self.path = os.path.abspath(os.path.expanduser(self.path))


@dataclass(kw_only=True)
class ExportConfig(StageConfig):
    """A stage's latest checkpoint as a Hugging Face directory (safetensors, config.json,
    generation_config.json, tokenizer files with our chat template) for transformers, no custom code."""

    kind: str = "export"
    init: str = ref()
    """The stage whose latest checkpoint is exported (pretrain, sft, import, ...)."""
    tokenizer: str = ref()
    """A tokenizer stage (its sentencepiece model is converted) or an import stage (copied)."""
    model: Optional[dict[str, Any]] = None
    """Overrides of the recipe's `model` for this stage (must match the checkpoint)."""
    dtype: str = "bfloat16"
    """bfloat16 | float16 | float32: the safetensors dtype (conversion itself runs in fp32)."""
    formats: list[str] = added(factory=list)
    """Quantized exports written beside the HF directory (<out>/quantized/), each reloaded and
    checked (stages.engine.hf.export_check): gguf_f32 | gguf_f16 | gguf_bf16 | gguf_q8_0 |
    gguf_q4_0 | gguf_q4_k_m (needs llama.cpp's llama-quantize on PATH) | w8a16 | w4a16
    (compressed-tensors pack-quantized, for vLLM)."""
    group_size: int = added(128)
    """w8a16/w4a16: inputs per scale; must divide every linear layer's input size (vLLM's Marlin
    kernels take 32, 64 or 128)."""
    thinking: Optional[str] = added()
    """on | off: write our chat template (data_recipes.chat) with that thinking mode into the
    export (tokenizer_config.json, GGUF, Modelfile). None: the tokenizer's own (ours with thinking
    for a tokenizer stage, an imported model's unchanged)."""
    eval_text: Optional[str] = added()
    """A UTF-8 text file the quantized formats are compared on against the unquantized export
    (held-out text); None: a built-in probe text."""
    eval_tokens: int = unhashed(1024)
    """Tokens of `eval_text` the comparison runs on."""
    verify: bool = unhashed(True)
    """Reload every quantized export with transformers and fail on a mismatch (see formats)."""

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype: {self.dtype!r}; one of bfloat16, float16, float32")
        for i, fmt in enumerate(self.formats):
            if fmt not in EXPORT_FORMATS:
                raise ValueError(f"formats[{i}]: {fmt!r} is not a format we write; one of "
                                 f"{', '.join(EXPORT_FORMATS)}")
            if fmt == "gguf_q4_k_m" and shutil.which("llama-quantize") is None:
                raise ValueError(f"formats[{i}]: gguf_q4_k_m needs llama.cpp's llama-quantize "
                                 "on PATH (gguf-py cannot write K-quants); not found")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats: {self.formats} names a format twice")
        if self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size}, must be at least 1")
        if self.thinking not in (None, "on", "off"):
            raise ValueError(f"thinking: {self.thinking!r}; one of on, off")
        if self.eval_text is not None:
            self.eval_text = os.path.abspath(os.path.expanduser(self.eval_text))
            if not os.path.isfile(self.eval_text):
                raise ValueError(f"eval_text: {self.eval_text} does not exist")
        if self.eval_tokens < 2:
            raise ValueError(f"eval_tokens: {self.eval_tokens}, must be at least 2")


EXPORT_FORMATS = ("gguf_f32", "gguf_f16", "gguf_bf16", "gguf_q8_0", "gguf_q4_0", "gguf_q4_k_m",
                  "w8a16", "w4a16")


def export_problems(cfg: ExportConfig, model: ModelConfig) -> list[tuple[str, str]]:
    """(key, problem) of an export config against the model it exports (the recipe loader and
    the export job both ask)."""
    out = []
    if any(f.startswith("w") for f in cfg.formats):
        d = model.head_dim or model.hidden_size // model.num_attention_heads
        for name, size in (("hidden_size", model.hidden_size),
                           ("ffn_hidden_size", model.ffn_hidden_size),
                           ("num_attention_heads * head_dim", model.num_attention_heads * d)):
            if size % cfg.group_size:
                out.append(("group_size", f"{cfg.group_size} does not divide {name} {size} "
                                          "(the input size of a linear layer)"))
                break
    for i, fmt in enumerate(cfg.formats):
        if fmt.startswith("gguf") and model.rope_scaling is not None:
            out.append((f"formats[{i}]", f"{fmt}: the GGUF writer knows llama and qwen3 without "
                                         f"RoPE scaling; model.rope_scaling is {model.rope_scaling!r}"))
    return out


ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}

ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "head_dim", "qk_layernorm", "rotary_base", "rope_scaling",
               "rope_scaling_factor", "rope_original_context", "yarn_beta_fast",
               "yarn_beta_slow", "yarn_attention_factor", "tie_embeddings", "norm_epsilon",
               "make_vocab_size_divisible_by")
"""The ModelConfig fields a checkpoint fixes (the others are training knobs: seq_length, dropout)."""

# config.json keys that do not change the weights or the forward pass of a causal LM
_NO_EFFECT = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
              "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
              "max_position_embeddings", "_name_or_path", "output_attentions",
              "output_hidden_states", "return_dict", "attention_dropout", "max_window_layers",
              "sliding_window", "tokenizer_class"}
# keys the reader below interprets (each either mapped or checked to hold a value we implement)
_READ = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
         "rope_parameters", "tie_word_embeddings", "vocab_size", "hidden_act", "attention_bias",
         "mlp_bias", "pretraining_tp", "use_sliding_window", "layer_types"}
# megatron-core's llama3 RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling defaults)
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


class UnsupportedModel(ValueError):
    """An HF config we cannot convert exactly; the message names the config.json field."""


_YARN_KEYS = {"original_max_position_embeddings": "rope_original_context",
              "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow",
              "attention_factor": "yarn_attention_factor"}
"""YaRN's rope parameters in config.json -> our ModelConfig fields (transformers' defaults when
absent: beta 32/1, attention factor from the factor)."""


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE fields (rotary_base, rope_scaling, rope_scaling_factor, yarn_*) from a
    transformers-4 (`rope_theta` + `rope_scaling`) or transformers-5 (`rope_parameters`) config."""
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = dict(cfg.get(key) or {})
    out: dict[str, Any] = {"rotary_base": float(params.pop("rope_theta",
                                                           cfg.get("rope_theta", 10000.0)))}
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedModel(f"{key}.rope_type: {kind!r} is not supported "
                               "(default, linear, llama3, yarn)")
    factor = float(params.pop("factor", 0.0) or 0.0)
    if kind == "llama3":
        for name, value in _LLAMA3_FIXED.items():
            if float(params.pop(name, value)) != value:
                raise UnsupportedModel(f"{key}.{name}: megatron-core's llama3 RoPE scaling fixes "
                                       f"it to {value:g}")
    if kind == "yarn":
        # transformers' standardize_rope_params defaults the original context to this
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        if params.pop("truncate", True) is not True:
            raise UnsupportedModel(f"{key}.truncate: only true (transformers' default) is "
                                   "supported")
        for hf_name, ours in _YARN_KEYS.items():
            value = params.pop(hf_name, None)
            if value is not None:
                out[ours] = int(value) if ours == "rope_original_context" else float(value)
    if params:
        raise UnsupportedModel(f"{key}.{sorted(params)[0]}: not understood for rope_type {kind}")
    if kind == "default":
        return out
    if factor <= 1:
        raise UnsupportedModel(f"{key}.factor: {kind} scaling needs a factor > 1")
    return {**out, "rope_scaling": kind, "rope_scaling_factor": factor}


def model_config_from_hf(cfg: dict[str, Any]) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab size) of an HF Llama/Qwen3 config.json; UnsupportedModel for anything
    we would have to ignore or cannot run exactly."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedModel(f"architectures: {archs} is not supported "
                               f"(one of {', '.join(ARCHITECTURES)})")
    unknown = sorted(k for k in cfg if k not in _NO_EFFECT | _READ)
    if unknown:
        raise UnsupportedModel(f"{unknown[0]}: config field not understood by the converter "
                               f"(would be ignored): {', '.join(unknown)}")
    expect = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
              "pretraining_tp": 1, "use_sliding_window": False}
    for key, value in expect.items():
        if key in cfg and cfg[key] != value:
            raise UnsupportedModel(f"{key}: {cfg[key]!r} is not supported (only {value!r})")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise UnsupportedModel("layer_types: only full_attention layers are supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    model = ModelConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        # None keeps megatron's default (hidden / heads), so a plain Llama stays hash-equal to a
        # recipe model that never mentions head_dim
        head_dim=None if head_dim * heads == cfg["hidden_size"] else head_dim,
        qk_layernorm=archs[0] == "Qwen3ForCausalLM",
        seq_length=min(cfg.get("max_position_embeddings") or 4096, 4096),
        **_rope(cfg),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=1,  # the HF table is used as is
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6), init_method_std=cfg.get("initializer_range", 0.02),
        hidden_dropout=0.0, attention_dropout=0.0)
    return model, cfg["vocab_size"]


def read_hf_config(path: str) -> tuple[ModelConfig, int]:
    """model_config_from_hf of the config.json in HF model directory `path`."""
    import json
    import os

    with open(os.path.join(os.path.expanduser(path), "config.json")) as f:
        return model_config_from_hf(json.load(f))


def architecture_mismatch(model: ModelConfig, imported: ModelConfig) -> list[str]:
    """`field: recipe X, checkpoint Y` for every architecture field where the two differ."""
    out = []
    for name in ARCH_FIELDS:
        a, b = getattr(model, name), getattr(imported, name)
        if name == "head_dim":
            a = a or model.hidden_size // model.num_attention_heads
            b = b or imported.hidden_size // imported.num_attention_heads
        if name == "rope_scaling_factor" and imported.rope_scaling is None:
            continue
        if a != b:
            out.append(f"{name}: recipe {a!r}, checkpoint {b!r}")
    return out


def hf_config(model: ModelConfig, vocab_size: int, dtype: str, special: dict[str, Any]) -> dict:
    """config.json for `model` (Qwen3 when it has qk-norm, Llama otherwise). Written with the
    transformers-4 rope keys, which transformers 5 still reads, so either version loads it."""
    qwen3 = model.qk_layernorm
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    rope_scaling = None
    if model.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": model.rope_scaling_factor}
    elif model.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **_LLAMA3_FIXED}
    elif model.rope_scaling == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": model.rope_scaling_factor,
                        "original_max_position_embeddings": model.rope_original_context,
                        "beta_fast": model.yarn_beta_fast, "beta_slow": model.yarn_beta_slow}
        if model.yarn_attention_factor is not None:
            rope_scaling["attention_factor"] = model.yarn_attention_factor
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen3 else "llama",
        "vocab_size": vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": model.norm_epsilon, "rope_theta": model.rotary_base,
        "rope_scaling": rope_scaling, "max_position_embeddings": model.seq_length,
        "tie_word_embeddings": model.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": model.init_method_std, "use_cache": True,
        "torch_dtype": dtype, **special}
    if model.rope_scaling == "yarn":  # the scaled context (transformers warns on another value)
        cfg["max_position_embeddings"] = int(model.rope_scaling_factor
                                             * model.rope_original_context)
    if qwen3:
        cfg.update(use_sliding_window=False, sliding_window=None)
    else:
        cfg.update(mlp_bias=False, pretraining_tp=1)
    return cfg
