"""SFT step time vs pretrain step time at the same shape, and engine generation throughput.

    python bench/sft.py                      # 4 layers, hidden 256, seq 256, batch 8, 2 threads
    python bench/sft.py --rounds 3 --steps 5

(a) Step time: the same GPTModel, DDP and optimizer (the stages' own build functions); a pretrain
    step (all tokens trained, plain causal mask, stages.engine.losses.lm_loss) vs an SFT step (samples
    of ~60-200 tokens packed to seq 256, per-sample block-causal mask and positions, loss on
    assistant tokens only, stages.sft.train_step). Best round's median.
(b) Generation (the sft_data engine backend and eval): new tokens/s and samples/s of
    stages.engine.generate.generate with the KV cache, batch 32, 64 new tokens, vs recomputing the whole
    prefix every token (what generation without a cache costs).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch

from stages.configs.model import ModelConfig
from stages.configs.base import OptimizerConfig, PostTrainingLRConfig
from stages.configs.post_training import SFTConfig

VOCAB = 4096


def shape(args) -> ModelConfig:
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                       ffn_hidden_size=int(args.hidden * 8 / 3) // 16 * 16,
                       num_attention_heads=args.hidden // 64, num_query_groups=args.hidden // 128,
                       seq_length=args.seq)


def bench_steps(args, info) -> tuple[float, float]:
    from data_recipes.sft_pack import pack
    from stages.engine.model import build_model
    from stages.engine.optim import build_ddp, build_optimizer
    from stages.engine.losses import lm_loss
    from schedulers.post_training import post_training_schedule
    from stages.sft import train_step

    cfg = shape(args)
    model = build_ddp(build_model(cfg, VOCAB, cfg.seq_length))
    sft_cfg = SFTConfig(tokenizer="t", data="d", global_batch_size=args.batch,
                        micro_batch_size=args.batch, lr=PostTrainingLRConfig(warmup_steps=0))
    optimizer = build_optimizer(model, OptimizerConfig(),
                                post_training_schedule(sft_cfg.lr, 100, sft_cfg.global_batch_size,
                                             cfg.seq_length, cfg.rotary_base))
    rng = random.Random(0)
    encoded = []
    for _ in range(400):  # chat-like samples: a 20-60 token prompt, the rest assistant tokens
        n, p = rng.randint(60, 200), rng.randint(20, 60)
        encoded.append(([rng.randrange(VOCAB) for _ in range(n)], [0] * p + [1] * (n - p)))
    packs = pack([len(e[0]) for e in encoded], cfg.seq_length, seed=0)
    s = cfg.seq_length
    pre_batch = {"tokens": torch.randint(0, VOCAB, (args.batch, s)),
                 "labels": torch.randint(0, VOCAB, (args.batch, s)),
                 "loss_mask": torch.ones(args.batch, s),
                 "position_ids": torch.arange(s)[None].expand(args.batch, s)}
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)

    def pretrain_step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        lm_loss(model, pre_batch, causal).backward()
        model.finish_grad_sync()
        optimizer.step()

    def sft_step(i):
        chunk = packs[(i * args.batch) % (len(packs) - args.batch):][:args.batch]
        train_step(model, optimizer, encoded, chunk, sft_cfg, s, 0, info)

    def timed(fn) -> float:
        times = []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            fn(i) if fn is sft_step else fn()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    pre, sft = [], []
    for _ in range(args.rounds):  # alternate, so load changes hit both alike
        pre.append(timed(pretrain_step))
        sft.append(timed(sft_step))
    return min(pre), min(sft)


def bench_generation(args) -> tuple[float, float, float]:
    from stages.engine.generate import SamplingConfig, generate
    from stages.engine.model import build_model

    cfg = shape(args)
    model = build_model(cfg, VOCAB, 512).eval()
    prompts = [[random.Random(i).randrange(VOCAB) for _ in range(40)] for i in range(32)]
    sampling = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=64)
    t = time.perf_counter()
    out = generate(model, prompts, sampling, set(), VOCAB)
    cached = time.perf_counter() - t
    new = sum(map(len, out))
    t = time.perf_counter()
    with torch.no_grad():  # no cache: the whole prefix again for every new token
        seqs = torch.tensor(prompts)
        for _ in range(64):
            n = seqs.shape[1]
            mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
            logits = model(seqs, torch.arange(n)[None].expand(len(prompts), n), mask)
            seqs = torch.cat([seqs, logits[:, -1, :VOCAB].argmax(-1, keepdim=True)], 1)
    uncached = time.perf_counter() - t
    return new / cached, len(prompts) / cached, new / uncached


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from stages.engine import distributed

    info = distributed.init(seed=0)
    pre, sft = bench_steps(args, info)
    tok_s, samples_s, uncached_tok_s = bench_generation(args)
    distributed.teardown()
    print(f"| shape | pretrain step | SFT step (packed) | ratio |\n|---|---|---|---|\n"
          f"| {args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.batch} | "
          f"{pre * 1000:.0f} ms | {sft * 1000:.0f} ms | {sft / pre:.2f} |")
    print(f"\n| generation (batch 32, 40-token prompts, 64 new) | new tokens/s | samples/s |\n"
          f"|---|---|---|\n| KV cache | {tok_s:.0f} | {samples_s:.2f} |\n"
          f"| no cache (recompute) | {uncached_tok_s:.0f} | {uncached_tok_s / 64:.2f} |")


if __name__ == "__main__":
    main()
