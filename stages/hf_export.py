"""The `export` stage: a stage's latest checkpoint -> a Hugging Face directory.

    python -m stages.hf_export --spec <output_dir>/spec.json

Output <output_dir>/hf/: model.safetensors, config.json (LlamaForCausalLM, or Qwen3ForCausalLM
when the model has qk-norm), generation_config.json (an imported model keeps its own), and the
tokenizer: tokenizer.json + tokenizer_config.json (with our chat template when the tokenizer has
the chat markers) converted from our sentencepiece model, or an imported model's own tokenizer
files copied as they were.
`transformers.AutoModelForCausalLM.from_pretrained(<dir>)` loads it without custom code.

The checkpoint is loaded into a TP=PP=1 model on one process: dist_checkpointing gathers the
shards of a sharded checkpoint on load (tested with TP=2; PP > 1 untested). The conversion runs
in the engine's dtype (fp32 on CPU, bf16 on GPU); `dtype` is that of the written tensors. Peak
memory: the model plus the copy being written (measured: 1.5x the fp32 size for a bf16 export).
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from data_recipes.config_fields import from_dict
from stages.configs.hf import ExportConfig
from stages.configs.model import ModelConfig
from stages.contract import StageSpec
from stages.engine import distributed, job
from stages.engine.hf.exporter import check_init_model, export_stage
from stages.engine.tracking import MetricLogger


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(ExportConfig, spec.config)
    model_cfg = from_dict(ModelConfig, spec.model)
    distributed.one_process()
    check_init_model(Path(spec.inputs["init"]), model_cfg)  # before megatron starts
    distributed.init(1, 1, seed=0)
    try:
        produced = export_stage(spec.inputs["init"], spec.inputs["tokenizer"], model_cfg,
                                spec.out / "hf", cfg.dtype)
    finally:
        distributed.teardown()
    produced["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"exported {produced['architecture']} to {produced['hf_dir']} in "
          f"{produced['seconds']:.1f}s, peak RSS {produced['peak_rss_mb']:.0f} MiB", flush=True)
    logger = MetricLogger(spec)
    logger.log(0, {k: produced[k] for k in ("seconds", "peak_rss_mb")})
    logger.close()
    return produced


if __name__ == "__main__":  # dist_checkpointing spawns helper processes: they re-import __main__
    job.main(run)
