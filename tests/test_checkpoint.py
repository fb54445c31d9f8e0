"""Checkpoints: atomic (partial ones are ignored and removed), keep-last-K, exact round trip."""

from __future__ import annotations

import json

import torch

from stages.engine import checkpoint as ckpt
from stages.configs.pretrain import LRConfig, PhaseConfig, PretrainConfig
from stages.configs.model import ModelConfig
from schedulers.fg_wsd import pretrain_schedule

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                    num_query_groups=2, seq_length=16, hidden_dropout=0.1, attention_dropout=0.1)
CONFIG = PretrainConfig(tokenizer="t", data="d", global_batch_size=2, micro_batch_size=2,
                        lr=LRConfig(warmup_tokens=32, decay_tokens=32),
                        phases=[PhaseConfig("only", 320, {"x": 1.0})])


def build():
    from stages.engine.model import build_model
    from stages.engine.optim import build_ddp, build_optimizer

    model = build_ddp(build_model(MODEL, vocab_size=100, max_seq_length=16))
    return model, build_optimizer(model, CONFIG.optimizer, pretrain_schedule(CONFIG, MODEL))


def train(model, optimizer, steps: int) -> None:
    from stages.pretrain import causal_mask

    mask = causal_mask(16, torch.device("cpu"))
    for _ in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        tokens = torch.randint(0, 100, (2, 16))
        model(tokens, torch.arange(16)[None], mask, labels=tokens).mean().backward()
        model.finish_grad_sync()
        optimizer.step()


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.named_parameters()}


def adam_state(optimizer) -> list[torch.Tensor]:
    """Every tensor of the torch Adam state, in parameter order (Megatron chains the optimizers)."""
    return [state[k].clone() for opt in optimizer.chained_optimizers
            for group in opt.optimizer.param_groups for p in group["params"]
            for state in [opt.optimizer.state[p]] for k in sorted(state) if torch.is_tensor(state[k])]


def fake_checkpoint(root, name, complete: bool):
    path = root / name
    path.mkdir(parents=True)
    if complete:
        (path / ckpt.MARKER).write_text(json.dumps({"step": 0}))
    return path


def test_partial_checkpoints_are_ignored_and_removed(tmp_path):
    good = fake_checkpoint(tmp_path, "step-000003", complete=True)
    fake_checkpoint(tmp_path, "step-000005.tmp", complete=True)   # killed before the rename
    fake_checkpoint(tmp_path, "step-000007", complete=False)      # no completion marker
    assert ckpt.latest_checkpoint(tmp_path) == good
    removed = ckpt.remove_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == ["step-000005.tmp", "step-000007"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000003"]
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


def test_prune_keeps_the_newest_complete(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, f"step-{step:06d}", complete=True)
    partial = fake_checkpoint(tmp_path, "step-000009.tmp", complete=False)
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    ckpt.prune(tmp_path, keep=0)  # never deletes the newest complete one
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000004"]
    assert partial.exists()  # pruning is about complete ones; remove_incomplete handles the rest


def test_latest_is_by_step_number_past_six_digits(tmp_path):
    fake_checkpoint(tmp_path, "step-999999", complete=True)
    newest = fake_checkpoint(tmp_path, "step-1000000", complete=True)
    assert ckpt.latest_checkpoint(tmp_path) == newest


def test_round_trip_restores_params_optimizer_and_rng(megatron_world, tmp_path):
    model, optimizer = build()
    train(model, optimizer, 2)
    saved = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {"step": 2, "note": "x"}, keep=2)
    assert saved == ckpt.step_dir(tmp_path, 2) and (saved / ckpt.MARKER).exists()
    want_params, want_adam = params(model), adam_state(optimizer)
    want_draw = torch.rand(4)  # what the RNG gives right after the save

    train(model, optimizer, 1)  # move everything away from the checkpoint
    assert any(not torch.equal(want_params[k], v) for k, v in params(model).items())

    extra = ckpt.load_checkpoint(saved, model, optimizer)
    assert extra["step"] == 2 and extra["note"] == "x"
    got = params(model)
    assert all(torch.equal(want_params[k], got[k]) for k in want_params)
    got_adam = adam_state(optimizer)
    assert len(got_adam) == len(want_adam) > 0
    assert all(torch.equal(a, b) for a, b in zip(want_adam, got_adam))
    assert torch.equal(torch.rand(4), want_draw)

    # keep-last-K during real saves, and weights-only init from a stage dir
    for step in (3, 4):
        train(model, optimizer, 1)
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    fresh, _ = build()
    ckpt.load_model_weights_only(tmp_path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(params(model).values(), params(fresh).values()))
