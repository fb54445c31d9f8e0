"""Hugging Face import/export: tiny random Llama and Qwen3 models made with transformers (no
downloads) -> import -> our logits == transformers' -> export -> transformers loads it and its
logits == ours; a pipeline-built model exported and greedy-decoded by transformers gives our
tokens; our sentencepiece tokenizer exported gives the same ids; unsupported configs fail clearly.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from stages.configs.model import ModelConfig
from stages.contract import MANIFEST, write_json_atomic  # noqa: E402
from stages.configs.hf import UnsupportedModel, model_config_from_hf

VOCAB = 320
SEQ = 24
TEXT = ("def add(a, b):\n    return a + b  # sum\n\n\tprint(add(12, 345))\n"
        "Ünïcødé 😀 中文 — tabs\t\tand   runs of spaces\n")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
ARCHS = {
    # llama: llama3 RoPE scaling (short wavelengths kept, long ones scaled), untied head
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_theta=10000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)),
    # qwen3: qk-norm, head_dim 16 != hidden/heads = 8, tied embeddings
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True)),
}


def _hf_tokenizer_json(path) -> None:
    """A byte-level BPE tokenizer.json trained here on TEXT: at most VOCAB entries (a model's
    table may be larger than its tokenizer, as Qwen3's is)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(path))


def make_hf_model(arch: str, path, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model saved with transformers (in `dtype`), every weight (norms too)
    non-trivial; returned as transformers loads it back, in fp32."""
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        rms_norm_eps=1e-6, eos_token_id=0, bos_token_id=None,
        initializer_range=0.2,  # peaked attention: RoPE (and any q/k layout error) shows in logits
        **{**extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms start at 1: randomise them, or a swapped norm would pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    _hf_tokenizer_json(path / "tokenizer.json")
    # without a tokenizer_class, transformers 5 would pick the architecture's own (Qwen2Tokenizer)
    # and rebuild this byte-level BPE with that class's pre-tokenizer
    write_json_atomic(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    n = tokens.shape[1]
    pos = torch.arange(n)[None].expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model.eval()(tokens, pos, mask).float()


def import_dir(src, out) -> dict:
    from stages.engine.hf.importer import import_model

    produced = import_model(src, out)
    write_json_atomic(out / MANIFEST, {"kind": "import", **produced})  # as job.main writes it
    return produced


def build_from(out, model_cfg: ModelConfig, vocab: int):
    from stages.engine.checkpoint import load_model_weights_only
    from stages.engine.model import build_model

    model = build_model(model_cfg, vocab, SEQ)
    load_model_weights_only(out, model)  # exactly what a later stage's `init:` does
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_import_then_export_round_trip(megatron_world, tmp_path, arch):
    from data_recipes.config_fields import from_dict
    from stages.engine.hf.exporter import export_stage

    # qwen3 is stored in bf16 as published models are: import reads it into our fp32 engine
    hf = make_hf_model(arch, tmp_path / "hf", torch.bfloat16 if arch == "qwen3" else torch.float32)
    produced = import_dir(tmp_path / "hf", tmp_path / "import")
    model_cfg = from_dict(ModelConfig, produced["model"])
    assert model_cfg.qk_layernorm == (arch == "qwen3")
    assert produced["format"] == "hf" and produced["vocab_size"] == VOCAB

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    model = build_from(tmp_path / "import", model_cfg, VOCAB)
    assert sum(p.numel() for p in model.parameters()) == produced["num_params"]  # head_dim, qk-norm
    ours = our_logits(model, tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{arch} import: max abs logit diff {diff:.2e}")
    assert ours.shape == theirs.shape and diff <= 1e-4

    with pytest.raises(ValueError, match=r"does not match .*num_layers: recipe 3, checkpoint 2"):
        export_stage(tmp_path / "import", tmp_path / "import",
                     dataclasses.replace(model_cfg, num_layers=3), tmp_path / "out", "float32")
    export_stage(tmp_path / "import", tmp_path / "import", model_cfg, tmp_path / "out", "float32")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             dtype=torch.float32).eval()
    assert type(back).__name__ == ARCHS[arch][1]
    with torch.no_grad():
        exported = back(tokens).logits
    diff = (exported - ours).abs().max().item()
    print(f"{arch} export: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    if arch == "qwen3":  # bf16 -> our fp32 -> bf16 is lossless: the same tensors, bit for bit
        from safetensors.torch import load_file

        export_stage(tmp_path / "import", tmp_path / "import", model_cfg, tmp_path / "bf16",
                     "bfloat16")
        source = load_file(tmp_path / "hf" / "model.safetensors")
        again = load_file(tmp_path / "bf16" / "model.safetensors")
        assert source.keys() == again.keys()
        assert all(again[k].dtype == torch.bfloat16 and torch.equal(again[k], source[k])
                   for k in source)
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")  # the imported one, copied
    source = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == source.encode(TEXT).ids


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_and_base_switch_are_exact(megatron_world, tmp_path, scaling):
    """Over 512 positions the scaling changes the logits (at 24 llama3's barely can: it scales
    only the lowest frequency), ours still equal transformers', and set_rotary_base (pretrain's
    per-phase ABF hook) keeps the scaling instead of silently dropping it."""
    from data_recipes.config_fields import from_dict
    from stages.engine.model import set_rotary_base

    hf = make_hf_model("llama", tmp_path / "hf", rope_scaling=scaling)
    produced = import_dir(tmp_path / "hf", tmp_path / "import")
    model_cfg = from_dict(ModelConfig, produced["model"])
    tokens = torch.randint(0, VOCAB, (1, 512), generator=torch.Generator().manual_seed(2))
    model = build_from(tmp_path / "import", model_cfg, VOCAB)
    before = our_logits(model, tokens)
    with torch.no_grad():
        assert (hf(tokens).logits - before).abs().max() <= 1e-4
    set_rotary_base(model, model_cfg.rotary_base)
    assert torch.equal(our_logits(model, tokens), before)
    unscaled = build_from(tmp_path / "import", dataclasses.replace(model_cfg, rope_scaling=None),
                          VOCAB)
    assert (our_logits(unscaled, tokens) - before).abs().max() > 1e-3


def _train_sentencepiece(tmp_path) -> tuple[dict, list[str]]:
    """A tokenizer stage's output (our sentencepiece BPE: byte fallback, chat markers) and the
    text it was trained on."""
    import glob
    import os

    from data_recipes.chat import SPECIAL_TOKENS
    from data_recipes.tokenizer_loading import load_processor
    from data_recipes.tokenizer_training import train_sentencepiece

    files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
    texts = [open(f, encoding="utf-8").read() for f in files]
    model_file = train_sentencepiece([texts], tmp_path / "tokenizer", 600, sample_bytes=200_000,
                                     special_tokens=SPECIAL_TOKENS)
    sp = load_processor(model_file)
    manifest = {"model_file": model_file, "vocab_size": sp.get_piece_size(),
                "eod_id": sp.eos_id(), "pad_id": sp.pad_id(), "bos_id": sp.bos_id()}
    (tmp_path / "tok").mkdir()
    write_json_atomic(tmp_path / "tok" / MANIFEST, manifest)
    return manifest, texts


def test_pipeline_model_export_greedy_and_tokenizer(megatron_world, tmp_path):
    from data_recipes.chat import IM_END, IM_START, THINK
    from data_recipes.tokenizer_loading import load_processor
    from stages.engine.hf.exporter import export_stage
    from stages.engine.hf.importer import save_weights
    from stages.engine.model import build_model

    manifest, texts = _train_sentencepiece(tmp_path)
    vocab = manifest["vocab_size"]
    # std 0.2: peaked logits, so greedy argmax is not decided by float noise between engines
    cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                      num_query_groups=2, seq_length=64, init_method_std=0.2)
    torch.manual_seed(3)
    model = build_model(cfg, vocab, cfg.seq_length)  # padded vocab 640: rows past 600 are dropped
    save_weights(model, tmp_path / "pretrain" / "checkpoints", step=7)
    export_stage(tmp_path / "pretrain", tmp_path / "tok", cfg, tmp_path / "out", "float32")

    # tokenizer: identical ids on real text (code, docstrings) and on the awkward cases
    sp = load_processor(manifest["model_file"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    sample = [TEXT, " leading space", "\n\n", "x" * 50, f"{IM_START}user\nhi{IM_END}\n"] + texts
    n = 0
    for text in sample:
        ids = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text[:40]
        assert tok.decode(ids) == text
        n += len(ids)
    assert n > 10_000
    # chat template: the same text as data_recipes.chat renders, the markers single tokens
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == f"{IM_START}user\n2+2?{IM_END}\n{IM_START}assistant\n"
    assert tok.convert_tokens_to_ids(THINK) == sp.piece_to_id(THINK)

    # greedy decoding: our engine (no cache) vs transformers generate
    prompt = torch.tensor([sp.encode("def main():\n")])
    ours = prompt
    for _ in range(16):
        nxt = our_logits(model, ours)[:, -1, :vocab].argmax(-1, keepdim=True)
        ours = torch.cat([ours, nxt], 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                           dtype=torch.float32).eval()
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    assert theirs.tolist() == ours.tolist()
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [sp.eos_id(), sp.piece_to_id(IM_END)]  # chat turns stop too
    assert len(set(ours[0, prompt.shape[1]:].tolist())) > 1  # not a degenerate repeat


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type"),
    ({"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.low_freq_factor"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_parameters.factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"quantization_config": {"bits": 4}}, "quantization_config"),
])
def test_unsupported_config_is_a_clear_error(change, field):
    base = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 300,
            "hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
            "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}
    model, vocab = model_config_from_hf(base)  # the base itself is fine
    assert model.head_dim == 16 and model.qk_layernorm and vocab == 300
    with pytest.raises(UnsupportedModel, match=rf"^{field}"):
        model_config_from_hf({**base, **change})


def test_import_refuses_a_dir_without_what_it_needs(tmp_path, monkeypatch):
    from stages.engine.distributed import one_process
    from stages.engine.hf.importer import read_hf_dir

    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. launcher.nproc_per_node: 2
    with pytest.raises(ValueError, match="run as one process, not 2"):
        one_process()

    make_hf_model("llama", tmp_path)
    read_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        read_hf_dir(tmp_path)
    from stages.engine.hf.importer import copy_tokenizer

    _hf_tokenizer_json(tmp_path / "tokenizer.json")
    config = json.loads((tmp_path / "config.json").read_text())
    assert copy_tokenizer(tmp_path, tmp_path / "t", config, "<|endoftext|>")["eod_id"] == 0
    with pytest.raises(ValueError, match="eod_token: '<eos>' is not a token"):
        copy_tokenizer(tmp_path, tmp_path / "t", config, "<eos>")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        read_hf_dir(tmp_path)


def test_hf_tokenizer_in_prepare_and_load_tokenizer(tmp_path):
    """An imported tokenizer encodes shards (encode_batch) and chat text (load_tokenizer) alike."""
    from tokenizers import Tokenizer

    from data_recipes.indexed_shards import encode_batch
    from data_recipes.tokenizer_loading import load_tokenizer

    _hf_tokenizer_json(tmp_path / "tokenizer.json")
    write_json_atomic(tmp_path / "eod.json", {"eod_id": 0})
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    docs = ["def add(a, b):", "print(add(12, 345))"]
    tokens, lengths = encode_batch(str(tmp_path / "tokenizer.json"), docs)
    expect = [ref.encode(d, add_special_tokens=False).ids + [0] for d in docs]
    assert tokens.tolist() == sum(expect, []) and lengths.tolist() == [len(e) for e in expect]
    tok = load_tokenizer({"format": "hf", "model_file": str(tmp_path / "tokenizer.json"),
                          "vocab_size": VOCAB, "eod_id": 0, "pad_id": 0})
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.token_id("<|endoftext|>") == 0


def _jan_nano_inputs(tmp_path, monkeypatch) -> None:
    """The tool corpus and question files recipes/jan_nano.yaml reads from the environment."""
    from data_recipes.tool_corpus import write_tool_corpus

    corpus, questions = write_tool_corpus(tmp_path / "corpus", seed=0, n_towns=3)
    for var, value in (("JAN_NANO_CORPUS", corpus), ("JAN_NANO_QUESTIONS", questions),
                       ("JAN_NANO_EVAL", questions)):
        monkeypatch.setenv(var, str(value))


@pytest.mark.slow
def test_jan_nano_recipe_validates_and_pipeline_export_runs(megatron_world, tmp_path, monkeypatch):
    """The recipe plans with a tiny Qwen3 in place of Qwen3-4B; a model that differs from the
    checkpoint is refused by name; `pipeline export` (the real job, in a subprocess) writes a dir
    transformers loads with the original's logits."""
    from pipeline.cli import main
    from pipeline.graph import build_graph
    from pipeline.recipe import RecipeError
    from pipeline.validate import load_recipe

    hf = make_hf_model("qwen3", tmp_path / "qwen3")
    _jan_nano_inputs(tmp_path, monkeypatch)
    tiny = [f"stages.base.path={tmp_path / 'qwen3'}", f"workdir={tmp_path / 'runs'}",
            "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=88",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.head_dim=16",
            "model.rotary_base=1000000", "model.norm_epsilon=1e-6", "model.seq_length=24"]
    graph = build_graph(load_recipe("recipes/jan_nano.yaml", tiny))
    assert [n.kind for n in graph.values()] == ["import", "rl", "rl", "eval", "export"]
    assert graph["rl.tool_use"].config.init == "base"  # RL without SFT
    assert graph["export"].config.init == "rl.correctness"
    with pytest.raises(RecipeError, match=r"model: does not match .*hidden_size: recipe 64, "
                                          r"checkpoint 32"):
        load_recipe("recipes/jan_nano.yaml", tiny + ["model.hidden_size=64"])

    import_dir(tmp_path / "qwen3", graph["base"].output_dir)  # the import stage, done in-process
    out = tmp_path / "exported"
    assert main(["export", "recipes/jan_nano.yaml", "base", *tiny, "--out", str(out),
                 "--dtype", "float32"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (back(tokens).logits - hf(tokens).logits).abs().max() <= 1e-4


# config.json of two public checkpoints as published (values only; nothing is downloaded)
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}


def test_published_configs_parse_and_jan_nano_describes_qwen3_4b(tmp_path, monkeypatch):
    from pipeline.validate import load_recipe
    from stages.configs.model import num_params

    llama, vocab = model_config_from_hf(LLAMA_32_1B)
    assert (llama.rope_scaling, llama.rope_scaling_factor, llama.head_dim) == ("llama3", 32.0, None)
    assert round(num_params(llama, vocab) / 1e9, 2) == 1.24  # Llama 3.2 1B: 1.24B
    qwen, vocab = model_config_from_hf(QWEN3_4B)
    assert round(num_params(qwen, vocab) / 1e9, 2) == 4.02  # Qwen3-4B: 4.02B
    (tmp_path / "Qwen3-4B").mkdir()
    write_json_atomic(tmp_path / "Qwen3-4B" / "config.json", QWEN3_4B)
    _jan_nano_inputs(tmp_path, monkeypatch)
    # validation reads config.json only: the recipe's model must be Qwen3-4B's, unchanged
    load_recipe("recipes/jan_nano.yaml", [f"stages.base.path={tmp_path / 'Qwen3-4B'}"])


TP2_JOB = '''
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist

if __name__ == "__main__":  # dist_checkpointing's helper processes re-import __main__
    from stages.engine import distributed
    from stages.engine.checkpoint import load_model_weights_only
    from stages.configs.model import ModelConfig
    from data_recipes.config_fields import from_dict
    from stages.engine.hf.importer import save_weights
    from stages.engine.model import build_model

    imported, out = Path(sys.argv[1]), Path(sys.argv[2])
    manifest = json.loads((imported / "manifest.json").read_text())
    distributed.init(tensor=2, pipeline=1, seed=0)
    model = build_model(from_dict(ModelConfig, manifest["model"]), manifest["vocab_size"], 24)
    load_model_weights_only(imported, model)  # the TP=1 import, resharded on load
    tokens = torch.load(out / "tokens.pt")
    n = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        part = model.eval()(tokens, torch.arange(n)[None].expand_as(tokens), mask)
    parts = [torch.empty_like(part) for _ in range(2)]  # each TP rank holds half the vocab
    dist.all_gather(parts, part.contiguous())
    if dist.get_rank() == 0:
        torch.save(torch.cat(parts, -1), out / "logits.pt")
    save_weights(model, out / "tp2" / "checkpoints", step=1)
    distributed.teardown()
'''


@pytest.mark.slow
def test_tensor_parallel_checkpoints_both_ways(megatron_world, tmp_path):
    """TP=2 (two gloo processes): a stage loads the TP=1 import with the HF logits, and its TP=2
    checkpoint exports (gathered into TP=1 on load) to a model with the same logits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from data_recipes.config_fields import from_dict
    from stages.engine.hf.exporter import export_stage

    hf = make_hf_model("qwen3", tmp_path / "hf")
    produced = import_dir(tmp_path / "hf", tmp_path / "import")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    torch.save(tokens, tmp_path / "tokens.pt")
    (tmp_path / "job.py").write_text(TP2_JOB)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", str(tmp_path / "job.py"), str(tmp_path / "import"),
                    str(tmp_path)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    with torch.no_grad():
        reference = hf(tokens).logits
    assert (torch.load(tmp_path / "logits.pt") - reference).abs().max() <= 1e-4

    export_stage(tmp_path / "tp2", tmp_path / "import", from_dict(ModelConfig, produced["model"]),
                 tmp_path / "out", "float32")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert (back(tokens).logits - reference).abs().max() <= 1e-4
