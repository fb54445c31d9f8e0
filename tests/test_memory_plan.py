"""The per-GPU memory plan: checked against Megatron-LM's own theoretical-memory formula, and the
validation error a stage that cannot fit gets.

Megatron-LM's `report_theoretical_memory` (megatron/training/theoretical_memory_usage.py, in the
training scripts, not in the megatron-core wheel) is transcribed below as the peer: weights +
optimizer per parameter, and its activation formula with sequence parallel + selective recompute
(Korthikanti et al. 2022, table 2). Where the two must agree they agree exactly; where they differ
the difference is the term the docstring of pipeline/memory_plan.py names.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from pipeline import memory_plan
from pipeline.memory_plan import GB, Shape, activations, kv_cache, layer_activation_bytes
from pipeline.memory_plan import weights_grads_optimizer
from stages.configs.base import MemoryConfig
from stages.configs.model import ModelConfig, padded_vocab_size

NANBEIGE_3B = ModelConfig(num_layers=32, hidden_size=2560, ffn_hidden_size=8192,
                          num_attention_heads=20, num_query_groups=4, seq_length=4096)
QWEN3_4B = ModelConfig(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                       num_query_groups=8, head_dim=128, qk_layernorm=True, tie_embeddings=True,
                       seq_length=4096, rotary_base=1e6)


# --- Megatron-LM's formula (the peer), transcribed --------------------------------------------------

def megatron_args(m: ModelConfig, vocab: int, tp=1, dp=1, mb=1, seq=None, distributed=False):
    return SimpleNamespace(
        kv_channels=m.head_dim or m.hidden_size // m.num_attention_heads,
        num_attention_heads=m.num_attention_heads, hidden_size=m.hidden_size,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size, swiglu=True,
        num_layers=m.num_layers, padded_vocab_size=padded_vocab_size(vocab, m),
        untie_embeddings_and_output_weights=not m.tie_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, data_parallel_size=dp,
        use_distributed_optimizer=distributed, seq_length=seq or m.seq_length,
        micro_batch_size=mb)


def megatron_weight_and_optimizer(a) -> float:
    q_ratio = a.kv_channels * a.num_attention_heads / a.hidden_size
    attn = 2 * a.hidden_size * a.hidden_size * ((1 + a.num_query_groups / a.num_attention_heads)
                                                * q_ratio)
    layer = 2 * a.hidden_size * (a.ffn_hidden_size * (3 / 2 if a.swiglu else 1) + 1) + attn
    embedding = a.hidden_size * a.padded_vocab_size
    block = layer * a.num_layers + a.hidden_size
    shard = (block + embedding) / a.tensor_model_parallel_size
    if a.untie_embeddings_and_output_weights:
        shard += embedding / a.tensor_model_parallel_size
    per_param = 6 + 12 / a.data_parallel_size if a.use_distributed_optimizer else 18
    return shard * per_param


def megatron_activation_per_layer_sp_selective(a) -> float:
    """compute_activation_memory's per-layer term (with SP and selective recompute), / TP."""
    return (a.seq_length * a.micro_batch_size * a.hidden_size
            * (18 + 4 * a.ffn_hidden_size / a.hidden_size)) / a.tensor_model_parallel_size


def shape(model, vocab=131072, tp=1, dp=1, mb=1, seq=None, fused=True, **memory) -> Shape:
    return Shape(model=model, vocab=vocab, tensor=tp, data=dp, context=1, micro_batch=mb,
                 seq_length=seq or model.seq_length, memory=MemoryConfig(**memory),
                 fused_attention=fused)


# --- agreement with Megatron's formula -------------------------------------------------------------

@pytest.mark.parametrize("dp, distributed", [(1, False), (256, False), (256, True), (8, True)])
def test_weights_grads_optimizer_equal_megatrons_bytes_per_parameter(dp, distributed):
    """3B: 18 bytes per parameter (bf16 weight, fp32 grad, fp32 main param + 2 moments), or
    6 + 12/DP with the distributed optimizer, exactly as Megatron counts them."""
    ours = sum(weights_grads_optimizer(shape(NANBEIGE_3B, dp=dp,
                                             distributed_optimizer=distributed)).values())
    assert ours == pytest.approx(megatron_weight_and_optimizer(
        megatron_args(NANBEIGE_3B, 131072, dp=dp, distributed=distributed)), rel=1e-12)


def test_qwen3_4b_differs_from_megatron_only_by_its_qk_norms():
    """Megatron's parameter count has no qk-layernorm weights (2 x head_dim per layer)."""
    ours = sum(weights_grads_optimizer(shape(QWEN3_4B, vocab=151936)).values())
    theirs = megatron_weight_and_optimizer(megatron_args(QWEN3_4B, 151936))
    assert ours - theirs == pytest.approx(18 * 2 * 128 * 36)


@pytest.mark.parametrize("tp", [2, 4])
def test_activations_per_layer_equal_megatrons_but_for_swiglu(tp):
    """With MHA, dropout and SP + selective recompute (the case Megatron's table-2 formula is
    for), ours and Megatron's per-layer bytes differ by exactly SwiGLU's extra tensors: Megatron
    counts a GeLU MLP (fc1 output + GeLU output, 4f bytes per token), a SwiGLU MLP keeps gate and
    up outputs, the SiLU output and the product (8f)."""
    mha = dataclasses.replace(NANBEIGE_3B, num_query_groups=20, hidden_dropout=0.1,
                              attention_dropout=0.1)
    s = shape(mha, tp=tp, mb=2, recompute="selective", sequence_parallel=True)
    theirs = megatron_activation_per_layer_sp_selective(megatron_args(mha, 131072, tp=tp, mb=2))
    tokens = 2 * 4096
    assert layer_activation_bytes(s, scores_stored=False) - theirs == \
        pytest.approx(tokens * 4 * mha.ffn_hidden_size / tp)


def test_gqa_stores_smaller_k_and_v_than_megatrons_formula_assumes():
    gqa, mha = NANBEIGE_3B, dataclasses.replace(NANBEIGE_3B, num_query_groups=20)
    head_dim = 128
    diff = layer_activation_bytes(shape(mha), False) - layer_activation_bytes(shape(gqa), False)
    assert diff == pytest.approx(4096 * 4 * (20 - 4) * head_dim)  # K and V, bf16


def test_recompute_and_fused_attention():
    base = shape(NANBEIGE_3B, mb=4, fused=False)
    full_layer_with_scores = layer_activation_bytes(base, True)
    # no fused attention: 5 bytes x heads x seq per token per layer of softmax in/out (+ no mask)
    assert full_layer_with_scores - layer_activation_bytes(base, False) == \
        pytest.approx(4 * 4096 * 4 * 20 * 4096)
    selective = activations(dataclasses.replace(base, memory=MemoryConfig(recompute="selective")))
    none = activations(base)
    assert none - selective == pytest.approx((32 - 1) * (full_layer_with_scores
                                                         - layer_activation_bytes(base, False)))
    full = activations(dataclasses.replace(base, memory=MemoryConfig(recompute="full")))
    output_and_ids = none - 32 * full_layer_with_scores
    # full: each layer keeps its input (2 bytes x hidden per token); one layer is rebuilt at a time
    assert full == pytest.approx(32 * 4 * 4096 * 2 * 2560 + full_layer_with_scores + output_and_ids)


def test_distributed_optimizer_and_offload_shrink_only_the_optimizer_states():
    plain = weights_grads_optimizer(shape(QWEN3_4B, vocab=151936, dp=8))
    dist = weights_grads_optimizer(shape(QWEN3_4B, vocab=151936, dp=8, distributed_optimizer=True))
    off = weights_grads_optimizer(shape(QWEN3_4B, vocab=151936, dp=8, distributed_optimizer=True,
                                        optimizer_cpu_offload=True, optimizer_offload_fraction=0.75))
    assert dist["optimizer states"] == pytest.approx(plain["optimizer states"] / 8)
    assert off["optimizer states"] == pytest.approx(dist["optimizer states"] / 4)
    assert off["weights"] == plain["weights"] and off["gradients"] == plain["gradients"]


def test_kv_cache_of_a_grpo_rollout_batch():
    """Qwen3-4B: 2 x 36 layers x 8 kv heads x 128 x 2 bytes = 144 KiB per token."""
    assert kv_cache(QWEN3_4B, batch=64, length=1024 + 512, tensor=1) == 64 * 1536 * 147456


# --- the plan of a recipe and its validation error -------------------------------------------------

def test_a_stage_that_cannot_fit_is_a_validation_error_with_breakdown_and_knob(tmp_path, monkeypatch):
    from pipeline.recipe import RecipeError
    from pipeline.validate import load_recipe

    monkeypatch.setattr(memory_plan, "fused_attention_available", lambda: True)
    # the 3B at TP 1, micro batch 4 and no savers (the recipe itself runs TP 2 + savers)
    gpu = ["launcher.gpus_per_node=8", "launcher.gpu_memory_gb=80", "stages.pretrain.parallel.tensor=1",
           "stages.pretrain.micro_batch_size=4",
           "stages.pretrain.memory={distributed_optimizer: false, recompute: none, "
           "sequence_parallel: false}"]
    with pytest.raises(RecipeError) as e:
        load_recipe("recipes/nanbeige3b.yaml", gpu + [
            "stages.pretrain.phases=[{name: a, tokens: 1e13, mixture: {web: 1.0}}]"])
    message = dict(e.value.problems)["stages.pretrain.memory"]
    assert "needs 121.9 GB per GPU, launcher.gpu_memory_gb is 80 (weights 6.4, gradients 12.8, " \
           "optimizer states 38.3, activations 64.5 GB)" in message
    assert message.endswith("memory.recompute: full would make it fit (74.6 GB)")
    recipe = load_recipe("recipes/nanbeige3b.yaml", gpu + [
        "stages.pretrain.phases=[{name: a, tokens: 1e13, mixture: {web: 1.0}}]",
        "stages.pretrain.memory={distributed_optimizer: true, recompute: full}"])
    plan = memory_plan.stage_memory(recipe, "pretrain")
    assert plan.fits and plan.total / GB == pytest.approx(36.5, abs=0.1)  # the figure it named


def test_pipeline_plan_exits_2_naming_the_key(monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "recipes/nanbeige3b.yaml",
                           "launcher.gpu_memory_gb=80", "stages.pretrain.parallel.tensor=1",
                           "stages.pretrain.memory.sequence_parallel=true"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "stages.pretrain.memory.sequence_parallel: needs parallel.tensor > 1" in proc.stderr
    assert "stages.pretrain.memory: needs " in proc.stderr
