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

`formats` adds quantized exports under <output_dir>/quantized/: model-<type>.gguf files (each with
an Ollama <name>.Modelfile beside it) and w8a16/, w4a16/ compressed-tensors directories, all
made from the HF directory's tensors (stages.engine.hf.gguf, .quantize). With `verify` (default)
each is reloaded by transformers and checked against our engine (stages.engine.hf.export_check):
a logit mismatch over 1e-4, a GGUF tokenizer that gives other ids or GGUF metadata that differs
from config.json fails the stage; the figures (and perplexity ratio, top-1 agreement, mean KL
against the unquantized export) go to MLflow and <output_dir>/export_check.json.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from data_recipes.config_fields import from_dict
from data_recipes.chat import chat_template
from stages.configs.hf import ExportConfig, export_problems
from stages.configs.model import ModelConfig
from stages.contract import MANIFEST, StageSpec, read_json, write_json_atomic
from stages.engine import distributed, job
from stages.engine.hf.export_check import default_eval_text, check_exports, failures
from stages.engine.hf.exporter import DTYPES, check_init_model, export_stage
from stages.engine.model import build_model
from stages.engine.tokenizer import tokenizer_of_stage
from stages.engine.tracking import MetricLogger


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(ExportConfig, spec.config)
    model_cfg = from_dict(ModelConfig, spec.model)
    problems = export_problems(cfg, model_cfg)
    if problems:
        raise ValueError("; ".join(f"{key}: {msg}" for key, msg in problems))
    distributed.one_process()
    check_init_model(Path(spec.inputs["init"]), model_cfg)  # before megatron starts
    distributed.init(1, 1, seed=0)
    try:
        produced = export_stage(spec.inputs["init"], spec.inputs["tokenizer"], model_cfg,
                                spec.out / "hf", cfg.dtype)
        if cfg.thinking is not None:
            set_chat_template(Path(produced["hf_dir"]), chat_template(cfg.thinking))
        start = time.perf_counter()
        checks = export_formats(spec, cfg, model_cfg, Path(produced["hf_dir"])) if cfg.formats else {}
        produced["formats_seconds"] = time.perf_counter() - start
    finally:
        distributed.teardown()
    produced["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"exported {produced['architecture']} to {produced['hf_dir']} in "
          f"{produced['seconds']:.1f}s, peak RSS {produced['peak_rss_mb']:.0f} MiB", flush=True)
    logger = MetricLogger(spec)
    logger.log(0, {k: produced[k] for k in ("seconds", "formats_seconds", "peak_rss_mb")})
    if checks:
        logger.log(0, {f"{fmt}/{k}": float(v) for fmt, r in checks["formats"].items()
                       for k, v in r.items() if isinstance(v, (int, float))})
        logger.artifact(spec.out / "export_check.json")
        produced.update(checks)
    logger.close()
    bad = failures(checks.get("formats", {}))
    if bad:
        raise RuntimeError("quantized export check failed:\n" + "\n".join(bad))
    return produced


def set_chat_template(hf_dir: Path, template: str) -> None:
    config = read_json(hf_dir / "tokenizer_config.json")
    write_json_atomic(hf_dir / "tokenizer_config.json", {**config, "chat_template": template})
    if (hf_dir / "chat_template.jinja").is_file():  # transformers 5 prefers it to the json key
        (hf_dir / "chat_template.jinja").write_text(template, encoding="utf-8")


def export_formats(spec: StageSpec, cfg: ExportConfig, model_cfg: ModelConfig,
                   hf_dir: Path) -> dict[str, Any]:
    """Write every format of `cfg.formats` under <out>/quantized/ and (verify) check them."""
    import shutil

    from data_recipes.chat import IM_END
    from stages.engine.hf.gguf import write_gguf, write_modelfile
    from stages.engine.hf.quantize import INT_FORMATS, write_compressed

    tok_manifest = read_json(Path(spec.inputs["tokenizer"]) / MANIFEST)
    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    ours = cfg.thinking or ("on" if tok_manifest.get("format", "sentencepiece") == "sentencepiece"
                            and tok.token_id(IM_END) is not None else None)
    qdir = spec.out / "quantized"
    shutil.rmtree(qdir, ignore_errors=True)
    files, written = {}, {}
    for fmt in cfg.formats:
        start = time.perf_counter()
        if fmt in INT_FORMATS:
            path = qdir / fmt
            write_compressed(hf_dir, path, fmt, cfg.group_size, DTYPES[cfg.dtype])
        else:
            path = write_gguf(hf_dir, tok_manifest, fmt, qdir / f"model-{fmt[len('gguf_'):]}.gguf")
            write_modelfile(path, ours, [IM_END] if tok.token_id(IM_END) is not None else [])
        files[fmt] = path
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.glob("*.safetensors")))
        written[fmt] = {"path": str(path), "bytes": size, "write_seconds": time.perf_counter() - start}
        print(f"{fmt}: {path} ({size / 2**20:.2f} MiB) in {written[fmt]['write_seconds']:.1f}s",
              flush=True)
    result = {"formats": written}
    if cfg.verify:
        model = build_model(model_cfg, tok.vocab_size, model_cfg.seq_length)
        text = (Path(cfg.eval_text).read_text(encoding="utf-8") if cfg.eval_text
                else default_eval_text())
        checks = check_exports(hf_dir, files, model, model_cfg, tok, text, cfg.eval_tokens,
                               cfg.group_size, DTYPES[cfg.dtype])
        result["eval_tokens"] = checks.pop("eval_tokens")
        for fmt, r in checks.items():
            written[fmt].update(r)
    write_json_atomic(spec.out / "export_check.json", result)
    return result


if __name__ == "__main__":  # dist_checkpointing spawns helper processes: they re-import __main__
    job.main(run)
