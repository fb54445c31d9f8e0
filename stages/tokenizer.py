"""The `tokenizer` stage: train a sentencepiece BPE tokenizer on a sample of sources, or adopt one.

    python -m stages.tokenizer --spec <output_dir>/spec.json

Output: <output_dir>/tokenizer.model and tokenizer.vocab. The manifest names the model file, its
sha256 and the special ids that later stages rely on (eod_id ends every document in a shard).
Training is deterministic and takes seconds, so a rerun simply trains again.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from data_recipes.sources import iter_documents
from data_recipes.tokenizer_loading import load_processor
from data_recipes.tokenizer_training import train_from_sample, write_sample
from stages.engine import job
from stages.configs.data import TokenizerConfig
from data_recipes.config_fields import from_dict
from stages.contract import StageSpec, sha256_file
from stages.engine.tracking import MetricLogger


def _adopt(model_file: str, prefix: Path) -> None:
    """Copy an existing model (and its .vocab, or one written from the model) into the output."""
    src = Path(model_file).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"model_file: {src} does not exist")
    shutil.copyfile(src, f"{prefix}.model.tmp")
    Path(f"{prefix}.model.tmp").replace(f"{prefix}.model")
    sp = load_processor(str(src.resolve()))
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    Path(f"{prefix}.vocab").write_text(vocab, encoding="utf-8")


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(TokenizerConfig, spec.config)
    spec.out.mkdir(parents=True, exist_ok=True)
    prefix = spec.out / "tokenizer"
    logger = MetricLogger(spec)
    start = time.perf_counter()
    sample_bytes = None

    if cfg.model_file:
        print(f"adopting {cfg.model_file}", flush=True)
        _adopt(cfg.model_file, prefix)
    else:
        if not cfg.sources:
            raise ValueError("sources: name at least one source to train on (or set model_file)")
        missing = [s for s in cfg.sources if s not in spec.sources]
        if missing:
            raise ValueError(f"sources: {', '.join(missing)} not among the spec's sources")
        sample = spec.out / "sample.txt"
        print(f"sampling up to {cfg.sample_bytes} bytes from {', '.join(cfg.sources)}",
              flush=True)
        try:
            sample_bytes = write_sample([iter_documents(spec.sources[s]) for s in cfg.sources],
                                        sample, cfg.sample_bytes)
            print(f"training BPE, vocab {cfg.vocab_size}, on {sample_bytes} bytes",
                  flush=True)
            train_from_sample(sample, prefix, cfg.vocab_size, cfg.seed, cfg.special_tokens)
        finally:
            sample.unlink(missing_ok=True)
    seconds = time.perf_counter() - start

    model_file = f"{prefix.resolve()}.model"
    sp = load_processor(model_file)
    produced = {"model_file": model_file, "vocab_size": sp.get_piece_size(),
                "eod_id": sp.eos_id(), "pad_id": sp.pad_id(), "bos_id": sp.bos_id(),
                "unk_id": sp.unk_id(), "sha256": sha256_file(model_file),
                "sample_bytes": sample_bytes}
    print(f"{model_file}: vocab {produced['vocab_size']}, eod {produced['eod_id']}, "
          f"{seconds:.1f}s", flush=True)
    logger.log(0, {"seconds": seconds, "vocab_size": produced["vocab_size"],
                   **({"sample_bytes": sample_bytes} if sample_bytes is not None else {})})
    logger.artifact(f"{prefix}.vocab")
    logger.close()
    return produced


if __name__ == "__main__":
    job.main(run)
