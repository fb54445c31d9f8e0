"""An exported Hugging Face directory as a GGUF file (llama.cpp, Ollama, LM Studio), written with
the `gguf` package, plus an Ollama Modelfile beside it.

What goes in (llama.cpp's names, from gguf-py's own tables):
  hyperparameters  `<arch>.*` keys from config.json (context, sizes, heads, head dim, eps, RoPE base)
  tensors          HF names mapped by gguf.TensorNameMap; llama's q/k rows permuted the way
                   llama.cpp's converter does (its RoPE kernel pairs dimension i with i + 1 where
                   HF's rotate-half pairs i with i + d/2); qwen3 takes them as they are
  tokenizer        an imported HF byte-level BPE as `gpt2` (tokens, merges, token types, the
                   pre-tokenizer named by its split pattern), our sentencepiece BPE as `llama`
                   (pieces, scores, types); rows of the embedding past the tokenizer's vocabulary
                   are [PAD<i>] tokens; the chat template of the exported directory
Types per tensor: stages.engine.hf.quantize.gguf_tensor_type. Q4_K_M goes through llama.cpp's
`llama-quantize` (gguf-py cannot write K-quants) when it is on PATH.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from stages.engine.hf.quantize import gguf_encode, gguf_tensor_type

GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
# byte-level pre-tokenizer split patterns llama.cpp knows by name (tokenizer.ggml.pre)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}
FILE_TYPES = {"gguf_f32": "ALL_F32", "gguf_f16": "MOSTLY_F16", "gguf_bf16": "MOSTLY_BF16",
              "gguf_q8_0": "MOSTLY_Q8_0", "gguf_q4_0": "MOSTLY_Q4_0", "gguf_q4_k_m": "MOSTLY_F16"}


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF q/k rows (rotate-half RoPE) in the order llama.cpp's llama graph expects."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_names(hf_config: dict, names: list[str]) -> dict[str, str]:
    """HF tensor name -> GGUF name (a tied lm_head has none: llama.cpp reuses token_embd)."""
    import gguf

    arch = GGUF_ARCH[hf_config["architectures"][0]]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf_config["num_hidden_layers"])
    out = {}
    for name in names:
        if name == "lm_head.weight" and hf_config.get("tie_word_embeddings"):
            continue
        target = name_map.get_name(name, try_suffixes=(".weight",))
        if target is None:
            raise ValueError(f"{name}: no GGUF name for this tensor ({arch})")
        out[name] = target
    return out


def gguf_tensors(hf_config: dict, get: Callable[[str], torch.Tensor],
                 names: list[str]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(HF name, GGUF name, tensor in GGUF layout) of every tensor in `names`."""
    llama = GGUF_ARCH[hf_config["architectures"][0]] == "llama"
    for name, target in gguf_names(hf_config, names).items():
        t = get(name)
        if llama and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf_config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            t = llama_permute(t, heads)
        yield name, target, t


# --------------------------------------------------------------------------------------------
# tokenizer


def _hf_tokenizer(hf_dir: Path, rows: int) -> dict[str, Any]:
    """Byte-level BPE tokenizer.json as gguf `gpt2` metadata."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE" or not _is_byte_level(tok.get("pre_tokenizer")):
        raise ValueError(f"{hf_dir / 'tokenizer.json'}: only byte-level BPE tokenizers are "
                         "written to GGUF")
    tokens: list[str | None] = [None] * rows
    types = [5] * rows  # UNUSED, until a token claims the id
    for piece, i in model["vocab"].items():
        if i < rows:
            tokens[i], types[i] = piece, 1
    for added in tok.get("added_tokens", []):
        if added["id"] < rows:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": _pre_tokenizer(tok.get("pre_tokenizer")), "tokens": tokens,
            "types": types, "merges": merges, "space_prefix": None}


def _is_byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _pre_tokenizer(pre: dict) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer (how text is split before BPE)."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]]
    raise ValueError(f"tokenizer.json pre_tokenizer: a split llama.cpp does not know by name "
                     f"({json.dumps(pre)[:120]}...)")


def _sentencepiece_tokenizer(model_file: str, rows: int) -> dict[str, Any]:
    """Our sentencepiece BPE as gguf `llama` (SPM) metadata: pieces, scores and types by id."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    # sentencepiece piece types 1..6 (normal, unknown, control, user, unused, byte) are gguf's
    tokens = [p.piece for p in proto.pieces] + [f"[PAD{i}]" for i in range(len(proto.pieces), rows)]
    scores = [p.score for p in proto.pieces] + [-1e9] * (rows - len(proto.pieces))
    types = [p.type for p in proto.pieces] + [5] * (rows - len(proto.pieces))
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores,
            "types": types, "merges": None,
            "space_prefix": bool(proto.normalizer_spec.add_dummy_prefix)}


def tokenizer_metadata(hf_dir: Path, tok_manifest: dict, rows: int) -> dict[str, Any]:
    if tok_manifest.get("format", "sentencepiece") == "sentencepiece":
        return _sentencepiece_tokenizer(tok_manifest["model_file"], rows)
    return _hf_tokenizer(hf_dir, rows)


def exported_chat_template(hf_dir: Path) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return cfg.get("chat_template")


# --------------------------------------------------------------------------------------------


def write_gguf(hf_dir: str | Path, tok_manifest: dict, fmt: str, out: str | Path) -> Path:
    """`out` (a .gguf file) from the exported HF directory `hf_dir` in format `fmt`."""
    import gguf
    from safetensors import safe_open

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[cfg["architectures"][0]]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(hf_dir.parent.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType[FILE_TYPES[fmt]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tok = tokenizer_metadata(hf_dir, tok_manifest, cfg["vocab_size"])
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok.get("scores") is not None:
        w.add_token_scores(tok["scores"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    if tok["space_prefix"] is not None:
        w.add_add_space_prefix(tok["space_prefix"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("pad_token_id", w.add_pad_token_id)):
        if cfg.get(key) is not None:
            add(cfg[key])
    eos = cfg.get("eos_token_id")
    if eos is not None:
        w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if "<|im_end|>" in tok["tokens"]:  # a chat turn ends generation in llama.cpp too
        w.add_eot_token_id(tok["tokens"].index("<|im_end|>"))
    w.add_add_bos_token(False)  # our data and Qwen3's have no BOS
    template = exported_chat_template(hf_dir)
    if template:
        w.add_chat_template(template)

    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        for _, name, t in gguf_tensors(cfg, lambda n: f.get_tensor(n).float(), list(f.keys())):
            qtype = gguf_tensor_type(fmt, name, tuple(t.shape))
            data = gguf_encode(t.numpy(), qtype)
            raw = None if data.dtype in (np.float32, np.float16) else qtype
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if fmt == "gguf_q4_k_m":
        _llama_quantize(tmp, out, "Q4_K_M")
        tmp.unlink()
    else:
        tmp.rename(out)
    return out


def _llama_quantize(src: Path, out: Path, kind: str) -> None:
    binary = shutil.which("llama-quantize")
    if binary is None:
        raise ValueError("formats: gguf_q4_k_m needs llama.cpp's llama-quantize on PATH")
    run = subprocess.run([binary, str(src), str(out), kind], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"llama-quantize failed ({run.returncode}): {run.stderr[-2000:]}")


def write_modelfile(gguf_file: Path, thinking: str | None, stop: list[str]) -> Path:
    """An Ollama Modelfile beside `gguf_file`: our chat format as a Go template (none for an
    imported model's own template: Ollama then reads the GGUF's), greedy-ish defaults, stops."""
    lines = [f"FROM ./{gguf_file.name}"]
    if thinking is not None:
        think = "<think>\n\n</think>\n\n"
        past = think  # earlier turns' reasoning is not replayed (as Qwen3's own template does)
        prompt = think if thinking == "off" else ""
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
                     '{{ if eq .Role "assistant" }}' + past + '{{ end }}'
                     '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n' + prompt + '"""')
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    path = gguf_file.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
