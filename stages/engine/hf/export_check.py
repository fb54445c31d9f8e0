"""Checks of the quantized exports, run by the export stage itself.

Per format:
  exactness  transformers loads the written file (GGUF: dequantized by gguf-py; W8A16/W4A16:
             decompressed by compressed-tensors) and its logits are compared with our engine's on
             the same tokens, our model's weights put through the same quantize -> dequantize
             (stages.engine.hf.quantize.roundtrip). A layout, name, metadata or packing bug shows
             here; quantization error does not (both sides have it).
  quality    our engine with the quantized weights against the unquantized export on a text:
             perplexity ratio, top-1 agreement and mean KL(unquantized || quantized) per token.
  tokenizer  (GGUF) the tokenizer transformers builds from the GGUF metadata gives our ids on a
             probe text (chat markers, code, whitespace runs, non-Latin scripts, emoji).
transformers 5.23 reads no head dim for qwen3 GGUFs (its Qwen3Config then assumes 128), so the
reader is given the export's config.json and the GGUF's hyperparameter keys are compared with it
one by one instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from stages.configs.model import ModelConfig
from stages.engine.hf.gguf import GGUF_ARCH, gguf_names
from stages.engine.hf.quantize import INT_FORMATS, roundtrip
from stages.engine.hf.weights import hf_to_megatron, megatron_name

PROBE_CHAT = ("<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n<|im_start|>assistant\n"
              "<think>\n\n</think>\n\nThe answer is 357.<|im_end|>\n")
PROBE_TEXT = ("def add(a, b):\n    return a + b  # sum\n\n\tprint(add(12, 345))\n"
              "Ünïcødé 😀 中文 — tabs\t\tand   runs of spaces\n\n\n  leading spaces")


def probe_text(tokenizer) -> str:
    """The tokenizer probe, with chat turns when the tokenizer has the chat markers."""
    from data_recipes.chat import SPECIAL_TOKENS

    chat = all(tokenizer.token_id(t) is not None for t in SPECIAL_TOKENS)
    return (PROBE_CHAT if chat else "") + PROBE_TEXT


def default_eval_text() -> str:
    """The standard library's json/decoder.py: code and prose the same on every machine."""
    return (Path(json.__file__).with_name("decoder.py")).read_text(encoding="utf-8")


def windows(ids: list[int], seq: int, max_tokens: int) -> torch.Tensor:
    """[n, seq] non-overlapping windows of the first `max_tokens` ids (at least one window)."""
    n = max(1, min(len(ids), max_tokens) // seq)
    ids = (ids * (n * seq // max(len(ids), 1) + 1))[:n * seq]  # a short text is repeated
    return torch.tensor(ids).view(n, seq)


def engine_logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    n = tokens.shape[1]
    pos = torch.arange(n)[None].expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model.eval()(tokens, pos, mask).float()[..., :vocab]


def load_into(model, get: Callable[[str], torch.Tensor], model_cfg: ModelConfig, vocab: int) -> None:
    params = dict(model.named_parameters())
    keys = set(params)
    with torch.no_grad():
        for name, tensor in hf_to_megatron(get, model_cfg, vocab):
            params[megatron_name(name, keys)].copy_(tensor)


def quality(ref: torch.Tensor, got: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Perplexity ratio (quantized / unquantized) on next-token prediction, top-1 agreement and
    mean KL(ref || got) over every position."""
    ref_lp, got_lp = ref.log_softmax(-1), got.log_softmax(-1)
    target = tokens[:, 1:].unsqueeze(-1)
    nll_ref = -ref_lp[:, :-1].gather(-1, target).mean()
    nll_got = -got_lp[:, :-1].gather(-1, target).mean()
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean()
    return {"ppl_ratio": float(torch.exp(nll_got - nll_ref)),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "mean_kl": float(kl)}


def gguf_metadata_problems(gguf_file: Path, hf_cfg: dict) -> list[str]:
    """GGUF hyperparameter keys that differ from config.json."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    arch = GGUF_ARCH[hf_cfg["architectures"][0]]
    head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
    want = {"embedding_length": hf_cfg["hidden_size"], "block_count": hf_cfg["num_hidden_layers"],
            "feed_forward_length": hf_cfg["intermediate_size"],
            "attention.head_count": hf_cfg["num_attention_heads"],
            "attention.head_count_kv": hf_cfg["num_key_value_heads"],
            "attention.key_length": head_dim, "rope.freq_base": hf_cfg["rope_theta"],
            "attention.layer_norm_rms_epsilon": hf_cfg["rms_norm_eps"],
            "vocab_size": hf_cfg["vocab_size"]}
    out = []
    for key, value in want.items():
        f = fields.get(f"{arch}.{key}")
        got = f.parts[f.data[0]][0].item() if f is not None else None
        if got is None or abs(float(got) - float(value)) > 1e-6 * max(1.0, abs(float(value))):
            out.append(f"{arch}.{key}: {got} != config.json {value}")
    return out


def check_exports(hf_dir: Path, files: dict[str, Path], model, model_cfg: ModelConfig,
                  tokenizer, text: str, max_tokens: int, group_size: int,
                  dtype: torch.dtype) -> dict[str, Any]:
    """Metrics per format (`files`: format -> written file or directory) and the tokenizer probe.
    `model` is our built GPTModel; its weights are replaced."""
    from safetensors import safe_open

    from data_recipes.chat import encode_text

    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    vocab = hf_cfg["vocab_size"]
    seq = min(model_cfg.seq_length, 256)
    tokens = windows(encode_text(tokenizer, text), seq, max_tokens)
    probe = probe_text(tokenizer)
    probe_ids = encode_text(tokenizer, probe)
    results: dict[str, Any] = {"eval_tokens": tokens.numel()}
    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        def read(name: str) -> torch.Tensor:
            return f.get_tensor(name).float()

        gguf_name = gguf_names(hf_cfg, list(f.keys()))
        load_into(model, read, model_cfg, vocab)
        reference = engine_logits(model, tokens, vocab)
        for fmt, path in files.items():
            start = time.perf_counter()
            load_into(model, lambda k: roundtrip(fmt, k, read(k), gguf_name=gguf_name.get(k, ""),
                                                 group_size=group_size, dtype=dtype),
                      model_cfg, vocab)
            ours = engine_logits(model, tokens, vocab)
            r: dict[str, Any] = quality(reference, ours, tokens)
            theirs, extra = _reader_logits(fmt, path, hf_dir, hf_cfg, tokens, probe, probe_ids)
            r.update(extra, max_abs_logit_diff=float((theirs - ours).abs().max()),
                     seconds=time.perf_counter() - start)
            results[fmt] = r
    return results


def _reader_logits(fmt: str, path: Path, hf_dir: Path, hf_cfg: dict, tokens: torch.Tensor,
                   probe: str, probe_ids: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """transformers' logits for the written `fmt` file, and (GGUF) its tokenizer and metadata."""
    import transformers

    extra: dict[str, Any] = {}
    if fmt in INT_FORMATS:
        reader = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.from_pretrained(hf_dir)
        reader = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        extra["tokenizer_ids_equal"] = (tok(probe, add_special_tokens=False)["input_ids"]
                                        == probe_ids)
        extra["metadata_problems"] = gguf_metadata_problems(path, hf_cfg)
    with torch.no_grad():
        logits = reader.eval()(tokens).logits.float()[..., :hf_cfg["vocab_size"]]
    return logits, extra


def failures(results: dict[str, Any], tolerance: float = 1e-4) -> list[str]:
    """What the checks found wrong, one line each."""
    out = []
    for fmt, r in results.items():
        if not isinstance(r, dict):
            continue
        if r["max_abs_logit_diff"] > tolerance:
            out.append(f"{fmt}: transformers' logits differ from ours by {r['max_abs_logit_diff']:.2e} "
                       f"(> {tolerance:g})")
        if r.get("tokenizer_ids_equal") is False:
            out.append(f"{fmt}: the GGUF tokenizer does not give our ids on the probe text")
        out += [f"{fmt}: {p}" for p in r.get("metadata_problems", [])]
    return out
