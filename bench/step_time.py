"""Pretrain step time: our engine (megatron-core GPTModel + Megatron DDP + Megatron optimizer, built
by the same functions the pretrain stage uses) vs a plain-PyTorch Llama-style GPT of the same shape
and parameter count (torch AdamW), in one process.

    python bench/step_time.py                 # 4 layers, hidden 256, seq 256, batch 8, 2 threads
    python bench/step_time.py --steps 20 --threads 1

A step = zero grads, forward + loss, backward, grad clip (1.0), optimizer step. Each round times
--steps steps after --warmup; the two are measured in alternating rounds and the best round's median
is reported, as wall time and as process CPU time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.configs.pretrain import LRConfig, PhaseConfig, PretrainConfig
from stages.configs.model import ModelConfig, num_params, padded_vocab_size
from stages.configs.base import OptimizerConfig
from schedulers.fg_wsd import pretrain_schedule

VOCAB = 4096


# --------------------------------------------------------------------------------------------
# plain PyTorch: RMSNorm, RoPE, GQA (SDPA), SwiGLU, no biases, untied embeddings


def rope_tables(seq: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # the non-interleaved layout megatron uses
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, self.heads, self.groups = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups
        self.head_dim = h // self.heads
        self.norm1 = nn.RMSNorm(h, eps=cfg.norm_epsilon)
        self.qkv = nn.Linear(h, h + 2 * self.groups * self.head_dim, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.norm2 = nn.RMSNorm(h, eps=cfg.norm_epsilon)
        self.fc1 = nn.Linear(h, 2 * cfg.ffn_hidden_size, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], -1)
        q = apply_rope(q.view(b, s, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, s, self.groups, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class PlainGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
        self.out = nn.Linear(cfg.hidden_size, vocab, bias=False)
        cos, sin = rope_tables(cfg.seq_length, cfg.hidden_size // cfg.num_attention_heads,
                               cfg.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=cfg.init_method_std)

    def forward(self, tokens, labels):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.out(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def plain_step_fn(cfg: ModelConfig, opt_cfg: OptimizerConfig, batch: int):
    model = PlainGPT(cfg, padded_vocab_size(VOCAB, cfg))
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt_cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=3e-4,
                                  betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2), eps=opt_cfg.adam_eps)
    tokens = torch.randint(0, VOCAB, (batch, cfg.seq_length))

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(tokens, tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_grad)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# our engine, through the pretrain stage's build functions


def engine_step_fn(cfg: ModelConfig, opt_cfg: OptimizerConfig, batch: int):
    from stages.engine.model import build_model
    from stages.engine.optim import build_ddp, build_optimizer
    from stages.engine.losses import lm_loss
    from stages.pretrain import causal_mask

    stage = PretrainConfig(tokenizer="-", data="-", global_batch_size=batch, micro_batch_size=batch,
                           optimizer=opt_cfg, lr=LRConfig(warmup_tokens=0, decay_tokens=0),
                           phases=[PhaseConfig("bench", 1e9, {"x": 1.0})])
    model = build_ddp(build_model(cfg, VOCAB, cfg.seq_length))
    optimizer = build_optimizer(model, opt_cfg, pretrain_schedule(stage, cfg))
    tokens = torch.randint(0, VOCAB, (batch, cfg.seq_length))
    b = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones_like(tokens),
         "position_ids": torch.arange(cfg.seq_length).expand(batch, -1)}
    mask = causal_mask(cfg.seq_length, torch.device("cpu"))

    def step():  # the same sequence as stages.pretrain.train_step with one micro-batch
        model.zero_grad_buffer()
        optimizer.zero_grad()
        lm_loss(model, b, mask).backward()
        model.finish_grad_sync()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """Median wall ms and median process-CPU ms per step (CPU time is what to compare on a
    machine shared with other jobs: contention inflates wall time, not the work done)."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall) * 1000, statistics.median(cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from stages.engine import distributed

    distributed.init(seed=0)
    ffn = 8 * math.ceil(args.hidden * 8 / 3 / 8)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=ffn,
                      num_attention_heads=args.hidden // 64, num_query_groups=max(args.hidden // 128, 1),
                      seq_length=args.seq)
    opt_cfg = OptimizerConfig()
    engine, n_engine = engine_step_fn(cfg, opt_cfg, args.batch)
    plain, n_plain = plain_step_fn(cfg, opt_cfg, args.batch)
    assert n_engine == n_plain == num_params(cfg, VOCAB), (n_engine, n_plain)
    # interleave the two measurements so drift on a shared machine hits both alike
    rounds = {"megatron-core engine": [], "plain PyTorch": []}
    for _ in range(args.rounds):
        rounds["megatron-core engine"].append(time_steps(engine, args.warmup, args.steps))
        rounds["plain PyTorch"].append(time_steps(plain, args.warmup, args.steps))
    print(f"shape: {args.layers} layers, hidden {args.hidden}, ffn {ffn}, seq {args.seq}, "
          f"batch {args.batch}, {n_engine:,} params, {args.threads} threads")
    best = {}
    for name, r in rounds.items():
        wall, cpu = min(w for w, _ in r), min(c for _, c in r)  # best round: least disturbed
        best[name] = (wall, cpu)
        print(f"{name:21s}: {wall:7.1f} ms/step wall, {cpu:7.1f} ms/step CPU "
              f"(wall medians per round: {', '.join(f'{w:.1f}' for w, _ in r)})")
    (ew, ec), (pw, pc) = best.values()
    print(f"ratio engine/plain   : {ew / pw:.3f} wall, {ec / pc:.3f} CPU   (target <= 1.10)")
    distributed.teardown()


if __name__ == "__main__":
    main()
