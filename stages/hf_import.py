"""The `import` stage: a Hugging Face Llama/Qwen3 directory -> a pipeline checkpoint + tokenizer.

    python -m stages.hf_import --spec <output_dir>/spec.json

Output:
  checkpoints/step-000000/   the weights as a dist_checkpointing checkpoint with its completion
                             marker: `init: <this stage>` loads it (checkpoint.load_model_weights_only)
  tokenizer/                 the model's tokenizer files, and eod.json (the end-of-document id)
The manifest carries the ModelConfig read from config.json (`model`), the tokenizer fields a
tokenizer stage's manifest has (format "hf", model_file = tokenizer/tokenizer.json, vocab_size =
the embedding rows, eod_id, pad_id, bos_id, sha256), the time and peak memory.

Conversion runs on one process (TP=PP=1) in the engine's dtype (fp32 on CPU, bf16 on GPU): a
tensor at a time is read from safetensors, laid out as megatron's and copied into the model.
Peak RSS (measured, 254M parameters): the fp32 model plus the memory-mapped source file (whose
pages the kernel can drop). A later stage with TP > 1 reshards on load (tested with TP=2).
"""

from __future__ import annotations

from typing import Any

from data_recipes.config_fields import from_dict
from stages.configs.hf import ImportConfig
from stages.contract import StageSpec
from stages.engine import distributed, job
from stages.engine.hf.importer import import_model, read_hf_dir
from stages.engine.tracking import MetricLogger


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(ImportConfig, spec.config)
    distributed.one_process()
    read_hf_dir(cfg.path)  # a clear error before the process group and megatron start
    logger = MetricLogger(spec)
    distributed.init(1, 1, seed=0)
    try:
        produced = import_model(cfg.path, spec.out, cfg.eod_token)
    finally:
        distributed.teardown()
    logger.log(0, {k: produced[k] for k in ("seconds", "peak_rss_mb", "num_params")})
    logger.close()
    return produced


if __name__ == "__main__":  # dist_checkpointing spawns helper processes: they re-import __main__
    job.main(run)
