"""YaRN RoPE scaling: a tiny random Qwen3 with `rope_scaling: yarn` made by transformers ->
import -> our logits == transformers' (fp32, <= 1e-4) over 4x the original context -> export ->
transformers reloads the same rope parameters and logits; the inverse frequencies equal
transformers' `_compute_yarn_parameters` at Qwen3-4B's published 128K setting; bad configs fail
naming the key; a model without yarn keeps its stage hashes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_recipes.config_fields import from_dict, hash_view  # noqa: E402
from stages.configs.hf import (UnsupportedModel, architecture_mismatch,  # noqa: E402
                               model_config_from_hf)
from stages.configs.model import ModelConfig  # noqa: E402
from test_hf import QWEN3_4B, VOCAB, build_from, import_dir, make_hf_model, our_logits  # noqa: E402

ORIGINAL = 64  # the "pretrained" context; the test runs 4x past it
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
YARN_FIELDS = ("rope_original_context", "yarn_beta_fast", "yarn_beta_slow", "yarn_attention_factor")


@pytest.mark.parametrize("scaling", [
    YARN,  # transformers' defaults: beta 32/1, attention factor 0.1 ln 4 + 1
    {**YARN, "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3},
], ids=["defaults", "explicit"])
def test_yarn_logits_equal_transformers_past_the_original_context(megatron_world, tmp_path,
                                                                   scaling):
    from stages.engine.hf.exporter import export_stage

    # base 1e4 with head_dim 16: the ramp spans real frequencies (at 1e6 nearly all interpolate)
    hf = make_hf_model("qwen3", tmp_path / "hf", rope_theta=10000.0, rope_scaling=scaling)
    produced = import_dir(tmp_path / "hf", tmp_path / "import")
    cfg = from_dict(ModelConfig, produced["model"])
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_context) == \
        ("yarn", scaling["factor"], ORIGINAL)
    assert (cfg.yarn_beta_fast, cfg.yarn_beta_slow) == (scaling.get("beta_fast", 32.0),
                                                        scaling.get("beta_slow", 1.0))
    tokens = torch.randint(0, VOCAB, (2, 4 * ORIGINAL), generator=torch.Generator().manual_seed(5))
    model = build_from(tmp_path / "import", cfg, VOCAB)
    ours = our_logits(model, tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits
    past = (ours - theirs)[:, ORIGINAL:].abs().max().item()
    print(f"yarn {scaling}: max |logit diff| vs transformers at positions {ORIGINAL}.."
          f"{4 * ORIGINAL - 1}: {past:.2e}, overall {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max() <= 1e-4

    if "attention_factor" not in scaling:  # (once is enough for the checks below)
        _yarn_halves_matter_and_survive_a_base_change(tmp_path, cfg, model, tokens, ours)

    export_stage(tmp_path / "import", tmp_path / "import", cfg, tmp_path / "out", "float32")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["max_position_embeddings"] == int(scaling["factor"] * ORIGINAL)
    assert architecture_mismatch(cfg, model_config_from_hf(written)[0]) == []  # yarn fields too
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(tokens).logits - ours).abs().max() <= 1e-4


def _yarn_halves_matter_and_survive_a_base_change(tmp_path, cfg, model, tokens, ours):
    """Unscaled frequencies, or no attention factor, give other logits; set_rotary_base
    (pretrain's per-phase base hook) keeps yarn."""
    from stages.engine.model import set_rotary_base

    unscaled = build_from(tmp_path / "import", dataclasses.replace(
        cfg, rope_scaling=None, rope_scaling_factor=1.0, rope_original_context=None,
        yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_attention_factor=None), VOCAB)
    assert (our_logits(unscaled, tokens) - ours).abs().max() > 1e-2
    flat = build_from(tmp_path / "import", dataclasses.replace(cfg, yarn_attention_factor=1.0),
                      VOCAB)
    assert (our_logits(flat, tokens) - ours).abs().max() > 1e-2
    set_rotary_base(model, cfg.rotary_base)
    assert torch.equal(our_logits(model, tokens), ours)


def test_inverse_frequencies_equal_transformers_at_qwen3_4b_128k():
    """Qwen3's documented YaRN for 128K (factor 4 over 32768), and a short-base case."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from stages.engine.yarn import yarn_inv_freq

    for theta, head_dim, rope in (
            (1e6, 128, {"factor": 4.0, "original_max_position_embeddings": 32768}),
            (1e4, 64, {"factor": 3.2, "original_max_position_embeddings": 40960,
                       "beta_fast": 8.0, "beta_slow": 0.5})):
        hf_cfg = transformers.Qwen3Config(
            hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
            max_position_embeddings=131072, rope_theta=theta,
            rope_scaling={"rope_type": "yarn", **rope})
        theirs, attention = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
        ours_cfg, _ = model_config_from_hf({**QWEN3_4B, "head_dim": head_dim,
                                            "rope_theta": theta,
                                            "rope_scaling": {"rope_type": "yarn", **rope}})
        ours = yarn_inv_freq(ours_cfg, ours_cfg.rotary_base, head_dim)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0), (ours - theirs).abs().max()
        assert ours_cfg.attention_factor() == pytest.approx(attention, rel=1e-12)


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling="ntk"), r"^rope_scaling: 'ntk' is not supported"),
    (dict(rope_scaling="yarn", rope_scaling_factor=1.0, rope_original_context=4096),
     r"^rope_scaling_factor: 1.0, must be > 1"),
    (dict(rope_scaling="yarn", rope_scaling_factor=0.5, rope_original_context=4096),
     r"^rope_scaling_factor: 0.5, must be > 1"),
    (dict(rope_scaling="yarn", rope_scaling_factor=4.0), r"^rope_original_context: None"),
    (dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_context=4096,
          yarn_beta_fast=1.0, yarn_beta_slow=2.0), r"^yarn_beta_slow: 2.0"),
    (dict(rope_scaling="linear", rope_scaling_factor=2.0, rope_original_context=4096),
     r"^rope_original_context: 4096 is set but rope_scaling is 'linear'"),
])
def test_bad_rope_scaling_names_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**change)


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 32768},
     "rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
      "truncate": False}, "rope_scaling.truncate"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
      "mscale": 1.0, "mscale_all_dim": 1.0}, "rope_scaling.mscale"),
    ({"rope_type": "dynamic", "factor": 4.0}, "rope_scaling.rope_type"),
])
def test_unsupported_yarn_config_json_names_the_field(rope, field):
    with pytest.raises(UnsupportedModel, match=rf"^{field}"):
        model_config_from_hf({**QWEN3_4B, "rope_scaling": rope})


def test_yarn_fields_stay_out_of_the_hash_until_set():
    plain = hash_view(ModelConfig())
    assert not set(YARN_FIELDS) & set(plain)  # existing stages keep their output dirs
    yarn = hash_view(ModelConfig(rope_scaling="yarn", rope_scaling_factor=4.0,
                                 rope_original_context=32768))
    assert yarn["rope_original_context"] == 32768 and "yarn_beta_fast" not in yarn
    # transformers 5 spelling (rope_parameters) reads the same as transformers 4's rope_scaling
    qwen_yarn = {**QWEN3_4B, "rope_scaling": None, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
        "rope_theta": 1e6}}
    assert model_config_from_hf(qwen_yarn)[0] == model_config_from_hf(
        {**QWEN3_4B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32768}})[0]
