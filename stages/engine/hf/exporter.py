"""A pipeline checkpoint written as a Hugging Face directory (safetensors, config.json, tokenizer
files with our chat template): the work of the `export` stage (stages.hf_export).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from stages.engine import checkpoint as ckpt
from stages.configs.model import ModelConfig
from data_recipes.config_fields import from_dict
from stages.contract import MANIFEST, read_json, write_json_atomic
from stages.configs.hf import architecture_mismatch, hf_config
from stages.engine.hf.weights import megatron_name, megatron_to_hf

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_weights(model, model_cfg: ModelConfig, vocab_size: int, out: Path, dtype: str,
                   special: dict[str, Any]) -> None:
    """model.safetensors + config.json + generation_config.json of our (unwrapped) GPTModel.
    `special`: token ids (and overrides) for config.json; `im_end_id` also ends generation."""
    from safetensors.torch import save_file

    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    keys = set(sd)
    tensors = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous()
               for name, t in megatron_to_hf(lambda n: sd[megatron_name(n, keys)], model_cfg,
                                             vocab_size)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    special = dict(special)
    im_end = special.pop("im_end_id", None)  # a chat model's turn ends there: generation stops too
    write_json_atomic(out / "config.json", hf_config(model_cfg, vocab_size, dtype, special))
    if (out / "generation_config.json").exists():  # an imported model's own (sampling defaults)
        return
    eos = [i for i in (special["eos_token_id"], im_end) if i is not None]
    write_json_atomic(out / "generation_config.json", {
        "bos_token_id": special["bos_token_id"], "pad_token_id": special["pad_token_id"],
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "do_sample": False})


# --------------------------------------------------------------------------------------------
# tokenizer


def sentencepiece_to_tokenizers(model_file: str):
    """Our sentencepiece BPE model as an equivalent `tokenizers.Tokenizer` (same ids).

    sentencepiece BPE merges the adjacent pair whose merged piece scores highest, and a BPE
    piece's score falls with its id; so every split of a piece into two vocabulary pieces becomes
    an HF merge ranked by the piece's id. Byte-fallback pieces (<0x41>) map to HF's byte_fallback,
    user-defined pieces (chat markers) to added tokens, matched before BPE as sentencepiece does.
    Whitespace: spaces become "▁", and a "▁" is prepended only if the model adds a dummy prefix.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    normal, unknown, control, user = 1, 2, 3, 4  # ModelProto.SentencePiece.Type
    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE or not proto.trainer_spec.byte_fallback:
        raise ValueError(f"{model_file}: only BPE models with byte fallback can be exported")
    if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.remove_extra_whitespaces:
        raise ValueError(f"{model_file}: only identity normalization without whitespace "
                         "collapsing can be exported exactly")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    ranked = sorted((i, vocab[p.piece[:k]], vocab[p.piece[k:]], p.piece[:k], p.piece[k:])
                    for i, p in enumerate(proto.pieces) if p.type == normal
                    for k in range(1, len(p.piece))
                    if p.piece[:k] in vocab and p.piece[k:] in vocab)
    unk = next(p.piece for p in proto.pieces if p.type == unknown)
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk,
                        fuse_unk=True, byte_fallback=True))
    prefix = proto.normalizer_spec.add_dummy_prefix
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (unknown, control)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == user])
    return tok


def export_sentencepiece(manifest: dict[str, Any], out: Path, max_length: int) -> dict[str, Any]:
    """tokenizer.json + tokenizer_config.json for our tokenizer stage's model; returns the
    special ids for config.json."""
    from data_recipes.chat import CHAT_TEMPLATE_JINJA, IM_END, SPECIAL_TOKENS
    from data_recipes.tokenizer_loading import load_processor

    sp = load_processor(manifest["model_file"])
    tok = sentencepiece_to_tokenizers(manifest["model_file"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    shutil.copyfile(manifest["model_file"], out / "tokenizer.model")

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    chat = all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
              "unk_token": piece(sp.unk_id()), "pad_token": piece(sp.pad_id()),
              "add_bos_token": False, "add_eos_token": False,  # our data has no BOS either
              "clean_up_tokenization_spaces": False}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE_JINJA
    write_json_atomic(out / "tokenizer_config.json", config)
    return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
            "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id(),
            "im_end_id": tok.token_to_id(IM_END) if chat else None}


def export_hf_tokenizer(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """An imported model's tokenizer files, copied unchanged."""
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(manifest["tokenizer_dir"]).iterdir():
        if f.name != "eod.json":
            shutil.copyfile(f, out / f.name)
    return {"bos_token_id": manifest.get("bos_id"), "eos_token_id": manifest["eod_id"],
            "pad_token_id": manifest["pad_id"]}


def export_tokenizer(manifest: dict[str, Any], out: Path, max_length: int) -> dict[str, Any]:
    fmt = manifest.get("format", "sentencepiece")
    if fmt == "sentencepiece":
        return export_sentencepiece(manifest, out, max_length)
    if fmt == "hf":
        return export_hf_tokenizer(manifest, out)
    raise ValueError(f"tokenizer format {fmt!r} cannot be exported (sentencepiece, hf)")


# --------------------------------------------------------------------------------------------


def check_init_model(init_dir: Path, model_cfg: ModelConfig) -> dict[str, Any]:
    """An import stage's manifest states the architecture: the recipe's model must be it.
    Returns the init stage's manifest ({} if it has none)."""
    manifest_path = init_dir / MANIFEST
    if not manifest_path.is_file():
        return {}
    manifest = read_json(manifest_path)
    if manifest.get("kind") == "import":
        diff = architecture_mismatch(model_cfg, from_dict(ModelConfig, manifest["model"]))
        if diff:
            raise ValueError(f"model does not match the checkpoint of {init_dir.name}: "
                             + "; ".join(diff))
    return manifest


def export_stage(init_dir: str | Path, tokenizer_dir: str | Path, model_cfg: ModelConfig,
                 out: str | Path, dtype: str = "bfloat16") -> dict[str, Any]:
    """Write `out` (needs stages.engine.distributed.init() with TP=PP=1); returns manifest fields."""
    import time

    from stages.engine.model import build_model

    start = time.perf_counter()
    init_dir, out = Path(init_dir), Path(out)
    init_manifest = check_init_model(init_dir, model_cfg)
    tok_manifest = read_json(Path(tokenizer_dir) / MANIFEST)
    vocab = tok_manifest["vocab_size"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    special = export_tokenizer(tok_manifest, tmp, model_cfg.seq_length)
    # an imported model keeps its context length (ours: the recipe's training seq_length)
    special["max_position_embeddings"] = (init_manifest.get("max_position_embeddings")
                                          or model_cfg.seq_length)
    model = build_model(model_cfg, vocab, model_cfg.seq_length)
    ckpt.load_model_weights_only(init_dir, model)
    export_weights(model, model_cfg, vocab, tmp, dtype, special)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    config = json.loads((out / "config.json").read_text())
    return {"hf_dir": str(out.resolve()), "architecture": config["architectures"][0],
            "dtype": dtype, "vocab_size": vocab, "seconds": time.perf_counter() - start}
