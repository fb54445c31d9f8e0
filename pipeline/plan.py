"""`pipeline plan`: the DAG, budgets, steps, outputs and a GPU-hours estimate. Touches nothing."""

from __future__ import annotations

from pipeline.budgets import assumptions, stage_budget
from pipeline.graph import StageNode
from pipeline.memory_plan import stage_memory, stage_vocab
from pipeline.recipe import Recipe
from pipeline.state import stage_state
from stages.configs.model import ModelConfig, num_params, padded_vocab_size
from stages.configs.pretrain import PretrainConfig
from schedulers.fg_wsd import pretrain_schedule


def render_plan(recipe: Recipe, graph: dict[str, StageNode]) -> str:
    lines = [f"pipeline {recipe.name!r}: {len(graph)} stages, workdir {recipe.workdir}", ""]
    hours: dict[str, float] = {}
    for name, node in graph.items():
        deps = f"  <- {', '.join(node.deps)}" if node.deps else ""
        state = stage_state(node.output_dir).state
        lines.append(f"{name} [{node.kind}]{deps}")
        lines.append(f"    output: {node.output_dir}  ({state})")
        launcher = node.launcher
        lines.append(f"    launcher: {launcher.kind}, {launcher.nodes} node(s) x "
                     f"{launcher.nproc_per_node} process(es)"
                     + (f", {launcher.gpus_per_node} GPU(s)/node" if launcher.gpus_per_node else ""))
        if isinstance(node.config, PretrainConfig):
            pretrain_lines, hours[name] = _pretrain(recipe, graph, node)
            lines += ["    " + line for line in pretrain_lines]
        budget = stage_budget(recipe, graph, node)
        if budget is not None:
            lines += ["    " + line for line in budget.lines]
            hours[name] = budget.gpu_hours
        memory = stage_memory(recipe, name)
        if memory is not None:
            lines += ["    " + line for line in memory.lines()]
        lines.append("")
    lines.append("GPU-hours per stage: " + (", ".join(f"{n} {h:,.1f}" for n, h in hours.items()
                                                     if h) or "none (CPU launchers)")
                 + f"; total {sum(hours.values()):,.1f}")
    lines.append(assumptions(recipe))
    return "\n".join(lines)


def _pretrain(recipe: Recipe, graph: dict[str, StageNode],
              node: StageNode) -> tuple[list[str], float]:
    cfg: PretrainConfig = node.config
    model = ModelConfig(**node.model)
    vocab = stage_vocab(recipe, cfg)  # an imported model's vocabulary is its config.json's
    params = num_params(model, vocab)
    schedule = pretrain_schedule(cfg, model)
    out = [f"model: {_human(params)} parameters ({model.num_layers} layers, hidden "
           f"{model.hidden_size}, ffn {model.ffn_hidden_size}, {model.num_attention_heads} heads / "
           f"{model.num_query_groups} kv groups, vocab {padded_vocab_size(vocab, model)})",
           f"global batch: {cfg.global_batch_size} sequences (micro batch {cfg.micro_batch_size}); "
           "per phase below",
           f"{'phase':<22}{'tokens':>10}{'steps':>10}{'start step':>12}{'batch':>7}{'seq':>7}"
           f"{'tokens/step':>13}{'rope base':>11}{'lr':>20}  mixture"]
    for phase in schedule.phases:
        lr = f"{schedule.lr(phase.start_step):.3g}..{schedule.lr(phase.end_step - 1):.3g}"
        mix = ", ".join(f"{s} {w:g}" for s, w in phase.mixture)
        out.append(f"{phase.name:<22}{_human(phase.tokens):>10}{phase.steps:>10}"
                   f"{phase.start_step:>12}{phase.global_batch_size:>7}{phase.seq_length:>7}"
                   f"{_human(phase.tokens_per_step):>13}{phase.rotary_base:>11g}{lr:>20}  {mix}")
    tokens = schedule.total_tokens
    out.append(f"{'total':<22}{_human(tokens):>10}{schedule.total_steps:>10}   warmup "
               f"{schedule.warmup_steps} steps, decay {schedule.decay_steps} steps "
               f"({cfg.lr.decay_style}), lr {cfg.lr.max:g} -> {cfg.lr.min:g}")
    flops = 6.0 * params * tokens
    gpus = node.launcher.nodes * node.launcher.gpus_per_node
    estimate = f"compute: 6·N·D = {flops:.3g} FLOPs"
    gpu_hours = 0.0
    if gpus:
        plan = recipe.plan
        hours = flops / (gpus * plan.gpu_peak_tflops * 1e12 * plan.mfu) / 3600
        gpu_hours = hours * gpus
        estimate += (f" = {hours * gpus:,.0f} GPU-hours at {plan.mfu:.0%} MFU of "
                     f"{plan.gpu_peak_tflops:g} TFLOP/s; {hours / 24:,.1f} days on {gpus} GPUs")
    else:
        estimate += " (CPU launcher: no GPU-hours estimate)"
    return out + [estimate], gpu_hours


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"
