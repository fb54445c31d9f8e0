"""Quantized exports (GGUF F32/Q8_0/Q4_0, compressed-tensors W8A16/W4A16), reloaded by their
readers: transformers (gguf-py dequantizes GGUF, compressed-tensors decompresses WNA16) gives our
engine's logits with the same quantize -> dequantize applied, the GGUF tokenizer gives our ids
(an imported byte-level BPE and our sentencepiece BPE), llama's q/k permutation is right; the
chat format's `thinking: off`; the zen_nano recipe; bad export configs fail naming the key.
Tiny models built here (tests/test_hf.py's helpers), nothing downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("compressed_tensors")

from test_hf import TEXT, VOCAB, _train_sentencepiece, import_dir, make_hf_model  # noqa: E402

from data_recipes.config_fields import from_dict  # noqa: E402
from stages.configs.hf import ExportConfig  # noqa: E402
from stages.configs.model import ModelConfig  # noqa: E402
from stages.contract import StageSpec  # noqa: E402

FORMATS = ["gguf_f32", "gguf_q8_0", "gguf_q4_0", "w8a16", "w4a16"]


def export_with_formats(tmp_path, init, tokenizer, model_cfg, formats, **cfg):
    """The export stage's work in this process (megatron_world is up): the HF directory, then
    every format written and checked. Returns export_formats' result."""
    from stages.engine.hf.exporter import export_stage
    from stages.hf_export import export_formats, set_chat_template

    config = from_dict(ExportConfig, {"init": "x", "tokenizer": "y", "formats": formats, **cfg})
    spec = StageSpec(name="export", kind="export", config={}, output_dir=str(tmp_path / "export"),
                     inputs={"init": str(init), "tokenizer": str(tokenizer)})
    produced = export_stage(init, tokenizer, model_cfg, spec.out / "hf", config.dtype)
    if config.thinking:
        from data_recipes.chat import chat_template

        set_chat_template(spec.out / "hf", chat_template(config.thinking))
    return export_formats(spec, config, model_cfg, spec.out / "hf"), produced


def test_qwen3_quantized_exports_reload_exactly(megatron_world, tmp_path):
    """Imported Qwen3 (qk-norm, head_dim 16 != hidden/heads, tied embeddings, byte-level BPE):
    every format reloads in transformers with our logits, and quantization error grows as bits
    shrink."""
    from safetensors.torch import load_file

    from stages.engine.hf.quantize import int_roundtrip

    make_hf_model("qwen3", tmp_path / "hf")
    produced = import_dir(tmp_path / "hf", tmp_path / "import")
    model_cfg = from_dict(ModelConfig, produced["model"])
    result, _ = export_with_formats(tmp_path, tmp_path / "import", tmp_path / "import", model_cfg,
                                    FORMATS, group_size=8, eval_tokens=96)
    r = result["formats"]
    for fmt in FORMATS:
        print(f"{fmt}: {r[fmt]['bytes']} bytes, max |logit diff| {r[fmt]['max_abs_logit_diff']:.2e}, "
              f"ppl ratio {r[fmt]['ppl_ratio']:.4f}, top-1 {r[fmt]['top1_agreement']:.3f}, "
              f"KL {r[fmt]['mean_kl']:.2e}")
        assert r[fmt]["max_abs_logit_diff"] <= 1e-4, fmt
    for fmt in ("gguf_f32", "gguf_q8_0", "gguf_q4_0"):
        assert r[fmt]["tokenizer_ids_equal"] and r[fmt]["metadata_problems"] == []
    # f32 is lossless; fewer bits: larger files' worth of error
    assert r["gguf_f32"]["mean_kl"] < 1e-9 and r["gguf_f32"]["top1_agreement"] == 1.0
    assert r["gguf_q8_0"]["mean_kl"] < r["gguf_q4_0"]["mean_kl"]
    assert r["w8a16"]["mean_kl"] < r["w4a16"]["mean_kl"]
    assert r["gguf_q4_0"]["bytes"] < r["gguf_q8_0"]["bytes"] < r["gguf_f32"]["bytes"]
    assert r["w4a16"]["bytes"] < r["w8a16"]["bytes"]

    # the peer check: compressed-tensors, inside transformers, decompresses our W4A16 directory
    # into exactly the weights our round trip gives
    w4 = tmp_path / "export" / "quantized" / "w4a16"
    config = json.loads((w4 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 8
    packed = load_file(w4 / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    assert packed[name + ".weight_packed"].dtype == torch.int32
    assert packed[name + ".weight_packed"].shape == (32, 88 * 4 // 32)  # 8 int4 per int32
    assert packed[name + ".weight_scale"].shape == (32, 88 // 8)
    source = load_file(tmp_path / "export" / "hf" / "model.safetensors")
    back = transformers.AutoModelForCausalLM.from_pretrained(w4, dtype=torch.float32)
    back(torch.zeros(1, 2, dtype=torch.long))  # the first forward decompresses
    mine = int_roundtrip(source[name + ".weight"].float(), 4, 8, torch.bfloat16)
    assert torch.equal(back.state_dict()[name + ".weight"], mine)


def test_llama_sentencepiece_gguf_and_modelfile(megatron_world, tmp_path):
    """A pipeline Llama (our sentencepiece tokenizer, untied head): llama.cpp's q/k permutation
    undone by transformers gives our logits; the GGUF's `llama` tokenizer gives our ids; the
    chat template (thinking off) and an Ollama Modelfile ship with it."""
    from data_recipes.chat import EMPTY_THINK, chat_template
    from stages.engine.hf.importer import save_weights
    from stages.engine.model import build_model

    manifest, _ = _train_sentencepiece(tmp_path)
    cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                      num_query_groups=2, seq_length=64, init_method_std=0.2)
    torch.manual_seed(3)
    model = build_model(cfg, manifest["vocab_size"], cfg.seq_length)
    save_weights(model, tmp_path / "pretrain" / "checkpoints", step=1)
    result, _ = export_with_formats(tmp_path, tmp_path / "pretrain", tmp_path / "tok", cfg,
                                    ["gguf_q8_0"], thinking="off", eval_tokens=128)
    r = result["formats"]["gguf_q8_0"]
    assert r["max_abs_logit_diff"] <= 1e-4 and r["tokenizer_ids_equal"], r
    assert r["metadata_problems"] == []
    gguf_file = tmp_path / "export" / "quantized" / "model-q8_0.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n{EMPTY_THINK}"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export" / "hf")
    assert hf_tok.chat_template == chat_template("off")
    modelfile = (gguf_file.with_suffix(".Modelfile")).read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert EMPTY_THINK + '"""' in modelfile  # the generation prompt closes the think block


def test_thinking_off_renders_qwen3s_empty_block_and_on_is_unchanged():
    from data_recipes.chat import (EMPTY_THINK, Message, chat_template, encode_chat, render,
                                   render_turn)

    chat = [Message("user", "2+2?"), Message("assistant", "4", "2 plus 2")]
    # the default rendering is the one every stage used before (hashes and data unchanged)
    assert render(chat, add_generation_prompt=True) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n2 plus 2\n</think>\n\n"
        "4<|im_end|>\n<|im_start|>assistant\n")
    off = render(chat, add_generation_prompt=True, thinking="off")
    assert off == ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>"
                   "\n\n4<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_turn(chat[1], "off") == ("<|im_start|>assistant\n" + EMPTY_THINK, "4<|im_end|>")

    class Chars:  # a tokenizer of one id per character; markers are ids 1000+
        markers = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]

        def token_id(self, piece):
            return 1000 + self.markers.index(piece)

        def encode(self, text):
            return [ord(c) for c in text]

    ids, mask = encode_chat(Chars(), chat, "off")
    trained = "".join(chr(i) if i < 1000 else "#" for i, m in zip(ids, mask) if m)
    assert trained == "4#"  # the answer and <|im_end|>: the empty block is context
    # the exported template renders what we train on (transformers' own jinja rendering)
    import jinja2

    messages = [{"role": m.role, "content": m.content} for m in chat]
    for thinking in ("on", "off"):
        text = jinja2.Template(chat_template(thinking)).render(messages=messages,
                                                               add_generation_prompt=True)
        want = render([Message(m.role, m.content) for m in chat], True, thinking)
        assert text == want


def _tiny_zen(tmp_path):
    """Overrides that make zen_nano a tiny Qwen3 whose tokenizer has Qwen3's chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    make_hf_model("qwen3", tmp_path / "qwen3")
    tok = Tokenizer(models.BPE())  # test_hf's byte-level BPE, trained with the markers
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    markers = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=markers,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:  # as in Qwen3: <think> is an added, not a special, token
        added["special"] = added["content"] not in ("<think>", "</think>")
    (tmp_path / "qwen3" / "tokenizer.json").write_text(json.dumps(spec))
    chats = tmp_path / "chats.jsonl"  # the user's conversations (OpenAI messages)
    with chats.open("w") as f:
        for a in range(24):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {a} + {a % 7}?"},
                {"role": "assistant", "content": f"Answer: {a + a % 7}"}]}) + "\n")
    return [f"workdir={tmp_path / 'runs'}", f"stages.chats.datasets.0.source.paths=[{chats}]",
            "model.num_layers=2", "model.hidden_size=32",
            "model.ffn_hidden_size=88", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.head_dim=16", "model.rotary_base=1000000", "model.norm_epsilon=1e-6",
            "model.seq_length=24", "stages.export.group_size=8"]


def test_zen_nano_recipe_validates_plans_and_refuses_bad_exports(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.graph import build_graph
    from pipeline.recipe import RecipeError
    from pipeline.validate import load_recipe

    tiny = _tiny_zen(tmp_path)
    monkeypatch.delenv("ZEN_NANO_BASE", raising=False)
    with pytest.raises(RecipeError, match=r"stages.base.path: environment variable ZEN_NANO_BASE "
                                          r"is not set"):
        load_recipe("recipes/zen_nano.yaml", tiny)
    monkeypatch.setenv("ZEN_NANO_BASE", str(tmp_path / "qwen3"))
    graph = build_graph(load_recipe("recipes/zen_nano.yaml", tiny))
    assert [n.kind for n in graph.values()] == ["import", "sft_tokenize", "sft", "eval", "export"]
    assert graph["sft"].config.thinking == graph["eval"].config.thinking == "off"
    assert graph["export"].config.formats == ["gguf_q8_0", "gguf_q4_0", "w4a16"]
    assert main(["plan", "recipes/zen_nano.yaml", *tiny]) == 0
    assert "export" in capsys.readouterr().out

    bad = {"stages.export.formats=[gguf_q3_k]": r"stages.export.formats\[0\]: 'gguf_q3_k' is not "
                                                r"a format we write",
           "stages.export.group_size=12": r"stages.export.group_size: 12 does not divide "
                                          r"hidden_size 32",
           "stages.sft.thinking=maybe": r"stages.sft.thinking: 'maybe'; one of on, off"}
    for override, message in bad.items():
        with pytest.raises(RecipeError, match=message):
            load_recipe("recipes/zen_nano.yaml", tiny + [override])
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize anywhere
    with pytest.raises(RecipeError, match=r"stages.export.formats\[1\]: gguf_q4_k_m needs "
                                          r"llama.cpp's llama-quantize on PATH"):
        load_recipe("recipes/zen_nano.yaml", tiny + ["stages.export.formats=[w4a16,gguf_q4_k_m]"])


def test_gguf_writer_refuses_what_it_does_not_know():
    """RoPE scaling is no architecture the GGUF writer (or transformers' GGUF reader) knows."""
    from stages.configs.hf import export_problems

    cfg = ExportConfig(init="a", tokenizer="b", formats=["w4a16", "gguf_q8_0"], group_size=32)
    scaled = ModelConfig(hidden_size=64, ffn_hidden_size=128, rope_scaling="llama3",
                         rope_scaling_factor=8.0)
    assert export_problems(cfg, scaled) == [
        ("formats[1]", "gguf_q8_0: the GGUF writer knows llama and qwen3 without RoPE scaling; "
                       "model.rope_scaling is 'llama3'")]
    assert export_problems(cfg, ModelConfig(hidden_size=64, ffn_hidden_size=128)) == []
    cfg.group_size = 48
    assert export_problems(cfg, ModelConfig(hidden_size=96, ffn_hidden_size=128))[0] == (
        "group_size", "48 does not divide ffn_hidden_size 128 (the input size of a linear layer)")


@pytest.mark.slow
def test_zen_nano_runs_on_a_tiny_qwen3(tmp_path, monkeypatch):
    """The whole recipe as real stage jobs, in graph order: import -> sft_tokenize ->
    SFT (thinking off) -> eval -> export with GGUF Q8_0/Q4_0 and W4A16, each reloaded and checked
    by the export job itself."""
    from conftest import finish_job, start_job
    from pipeline.graph import build_graph, make_spec
    from pipeline.validate import load_recipe
    from stages.configs import stage_module
    from stages.contract import MANIFEST, read_json, save_spec

    tiny = _tiny_zen(tmp_path) + [
        "model.seq_length=256",
        "stages.sft.epochs=1", "stages.sft.global_batch_size=4", "stages.sft.micro_batch_size=2",
        "stages.sft.heldout_samples=4", "stages.sft.lr.warmup_steps=1",
        "stages.sft.model={seq_length: 256}",  # the import says 24 (its max_position_embeddings)
        "stages.eval.prompts.num=4", "stages.eval.prompts.max_digits=1",
        "stages.eval.max_new_tokens=8", "stages.eval.samples=0", "stages.export.eval_tokens=64"]
    monkeypatch.setenv("ZEN_NANO_BASE", str(tmp_path / "qwen3"))
    graph = build_graph(load_recipe("recipes/zen_nano.yaml", tiny))
    for node in graph.values():
        node.output_dir.mkdir(parents=True)
        finish_job(start_job(stage_module(node.kind), save_spec(make_spec(node, graph))))
    export = read_json(graph["export"].output_dir / MANIFEST)
    for fmt in ("gguf_q8_0", "gguf_q4_0", "w4a16"):
        r = export["formats"][fmt]
        assert r["max_abs_logit_diff"] <= 1e-4 and r["bytes"] > 0, (fmt, r)
    assert read_json(graph["eval"].output_dir / MANIFEST)["prompts"] == 4
    tok = transformers.AutoTokenizer.from_pretrained(graph["export"].output_dir / "hf")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<think>\n\n</think>\n\n")
