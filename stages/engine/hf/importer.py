"""A Hugging Face Llama/Qwen3 directory read into our GPTModel and saved as a pipeline checkpoint
(with its tokenizer files): the work of the `import` stage (stages.hf_import).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from stages.engine import checkpoint as ckpt
from stages.configs.model import ModelConfig, num_params
from stages.contract import read_json, sha256_file, write_json_atomic
from stages.configs.hf import UnsupportedModel, model_config_from_hf
from stages.engine.hf.weights import hf_to_megatron, megatron_name

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model")
# tensors an HF checkpoint may hold that carry nothing we need (recomputed or tied)
_REDUNDANT = ("rotary_emb.inv_freq",)


def read_hf_dir(path: str | os.PathLike) -> tuple[dict, ModelConfig, int]:
    """(config.json, ModelConfig, vocab size); every problem is raised before any work is done."""
    src = Path(path).expanduser()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"path: {src} has no config.json (not a Hugging Face model dir)")
    hf_cfg = read_json(src / "config.json")
    model, vocab = model_config_from_hf(hf_cfg)
    if not (src / "model.safetensors").is_file() and not (src / "model.safetensors.index.json").is_file():
        raise FileNotFoundError(f"path: {src} has no model.safetensors(.index.json); "
                                "only safetensors weights are read")
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"path: {src} has no tokenizer.json (a fast tokenizer is needed)")
    return hf_cfg, model, vocab


class _SafetensorsReader:
    """Tensors of a (possibly sharded) safetensors checkpoint by name, opened lazily."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index)["weight_map"]
        else:
            with safe_open(src / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        self.src, self.weight_map, self.used = src, weight_map, set()
        self._open = {name: safe_open(src / name, "pt") for name in set(weight_map.values())}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise UnsupportedModel(f"{self.src}: tensor {name} is missing from the checkpoint")
        self.used.add(name)
        return self._open[self.weight_map[name]].get_tensor(name).float()

    def unused(self) -> list[str]:
        return sorted(k for k in self.weight_map
                      if k not in self.used and not k.endswith(_REDUNDANT)
                      and k != "lm_head.weight")  # a tied model may still store its head


def load_hf_weights(model, src: str | os.PathLike, model_cfg: ModelConfig, vocab: int) -> None:
    """Copy an HF checkpoint's tensors into our built GPTModel (every parameter, exactly once)."""
    read = _SafetensorsReader(Path(src).expanduser())
    params = dict(model.named_parameters())
    keys = set(params)
    done = set()
    with torch.no_grad():
        for name, tensor in hf_to_megatron(read, model_cfg, vocab):
            name = megatron_name(name, keys)
            if params[name].shape != tensor.shape:
                raise UnsupportedModel(f"{name}: checkpoint gives {tuple(tensor.shape)}, the model "
                                       f"built from config.json has {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            done.add(name)
    if keys - done:
        raise RuntimeError(f"parameters not set by the mapping: {sorted(keys - done)}")
    if read.unused():
        raise UnsupportedModel(f"checkpoint tensors the mapping would ignore: {read.unused()[:5]}")


def save_weights(model, root: str | os.PathLike, step: int = 0) -> Path:
    """A weights-only checkpoint `root/step-000000` with the completion marker, written atomically
    like checkpoint.save_checkpoint (no optimizer: a later stage starts its own). Collective."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    rank0 = dist.get_rank() == 0
    final = ckpt.step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))
    dist.barrier()
    if rank0:
        write_json_atomic(tmp / ckpt.MARKER, {"step": step, "weights_only": True})
        os.replace(tmp, final)
    dist.barrier()
    return final


def _special_ids(src: Path, hf_cfg: dict) -> dict[str, int | None]:
    """EOD = the model's eos (config.json, else generation_config.json; the first of a list)."""
    gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}

    def first(key):
        v = hf_cfg.get(key)
        if v is None:
            v = gen.get(key)
        return v[0] if isinstance(v, list) else v

    eod = first("eos_token_id")
    if eod is None:
        raise UnsupportedModel("eos_token_id: config.json and generation_config.json do not name "
                               "one (needed as the end-of-document token)")
    pad = first("pad_token_id")
    return {"eod_id": eod, "pad_id": eod if pad is None else pad, "bos_id": first("bos_token_id")}


def copy_tokenizer(src: Path, out: Path, hf_cfg: dict, eod_token: str | None = None) -> dict[str, Any]:
    """The tokenizer files into out/, plus eod.json; returns the manifest's tokenizer fields."""
    from data_recipes.tokenizer_loading import load_hf_tokenizer

    ids = _special_ids(src, hf_cfg)
    if eod_token is not None:
        ids["eod_id"] = load_hf_tokenizer(str(src / "tokenizer.json")).token_to_id(eod_token)
        if ids["eod_id"] is None:
            raise ValueError(f"eod_token: {eod_token!r} is not a token of {src / 'tokenizer.json'}")
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    write_json_atomic(out / "eod.json", {"eod_id": ids["eod_id"]})
    model_file = str((out / "tokenizer.json").resolve())
    return {"format": "hf", "model_file": model_file, "tokenizer_dir": str(out.resolve()),
            "vocab_size": hf_cfg["vocab_size"], "sha256": sha256_file(model_file), **ids}


def import_model(src: str | os.PathLike, out: str | os.PathLike,
                 eod_token: str | None = None) -> dict[str, Any]:
    """Convert `src` into `out` (needs stages.engine.distributed.init()); returns the manifest fields."""
    from stages.engine.model import build_model

    start = time.perf_counter()
    src, out = Path(src).expanduser().resolve(), Path(out)
    hf_cfg, model_cfg, vocab = read_hf_dir(src)
    tokenizer = copy_tokenizer(src, out / "tokenizer", hf_cfg, eod_token)
    root = out / "checkpoints"
    ckpt.remove_incomplete(root)
    path = ckpt.latest_checkpoint(root)
    if path is None:  # a rerun after a kill finds the finished checkpoint and skips the work
        model = build_model(model_cfg, vocab, model_cfg.seq_length)
        load_hf_weights(model, src, model_cfg, vocab)
        path = save_weights(model, root)
        del model
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"imported {src} ({hf_cfg['architectures'][0]}, "
          f"{num_params(model_cfg, vocab):,} parameters) in {seconds:.1f}s, "
          f"peak RSS {peak_mb:.0f} MiB", flush=True)
    return {"source": str(src), "architecture": hf_cfg["architectures"][0],
            "model": dataclasses.asdict(model_cfg), "checkpoint": str(path),
            "max_position_embeddings": hf_cfg.get("max_position_embeddings"),
            "num_params": num_params(model_cfg, vocab), "seconds": seconds,
            "peak_rss_mb": round(peak_mb, 1), **tokenizer}
