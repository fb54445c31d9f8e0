"""The prepared GPU check: one command, one JSON line, through the engine the stages use.

    python bench/gpu_check.py                 # one GPU, ~1B Llama, bf16 (about 3-5 min on an H200)
    python bench/gpu_check.py --cpu-smoke     # the same code at a toy size on CPU (fp32), ~1 min

On a machine without megatron-core (e.g. an NGC-style image: Python 3.12, its own torch, no
TransformerEngine) carry the wheel along: `pip install --no-deps megatron_core-0.16.1-cp312-*.whl
psutil` first (megatron-core pulls only numpy and packaging, both in such images).

What it measures, in this order:
1. pretraining: bf16 steps of a ~1.1B Llama (16 layers, hidden 2048, SwiGLU 8192, GQA 32/8,
   vocab 32000) at sequence 4096, Megatron DDP + the distributed optimizer, selective recompute
   (the local layer spec stores s^2 attention scores otherwise); tokens/s and MFU (6·N·tokens +
   attention 12·L·h·s per token, over the GPU's dense bf16 peak: --peak-tflops, H100/H200 989).
2. packed SFT: the same model on sequences packed from several samples (block-diagonal causal
   mask, positions restarting per sample, loss on half the tokens); tokens/s.
3. GRPO rollout: stages.engine.generate (the KV-cache generator the rl stage uses), batch 64,
   1024 new tokens after 128-token prompts, temperature 1, no stop token; new tokens/s.
4. checkpoint: save and load of the 1B model with its optimizer through stages.engine.checkpoint
   (megatron dist_checkpointing); seconds each, GB on disk, params equal after the load.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BILLION = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
               num_query_groups=8, seq_length=4096, rotary_base=500000.0)
TOY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
           num_query_groups=2, seq_length=256)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (checks the code)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps of pretraining and SFT")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--rollout-batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temp dir)")
    args = p.parse_args()
    if args.cpu_smoke:
        args.steps, args.micro_batch, args.rollout_batch, args.new_tokens = 2, 2, 4, 16
    return args


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def causal_mask(torch, seq: int, device):
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), 1)


def packed_batch(torch, b: int, seq: int, vocab: int, device, gen):
    """b rows, each packed from samples of 200-1500 tokens: block-diagonal causal mask (True =
    masked), positions restarting per sample, loss on the second half of each sample."""
    mask = torch.ones(b, 1, seq, seq, dtype=torch.bool)
    positions = torch.zeros(b, seq, dtype=torch.long)
    loss_mask = torch.zeros(b, seq)
    lo, hi = (200, 1500) if seq >= 2048 else (seq // 8, seq // 3)
    for row in range(b):
        start = 0
        while start < seq:
            n = min(int(torch.randint(lo, hi, (1,), generator=gen)), seq - start)
            block = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
            mask[row, 0, start:start + n, start:start + n] = block
            positions[row, start:start + n] = torch.arange(n)
            loss_mask[row, start + n // 2:start + n] = 1
            start += n
    tokens = torch.randint(0, vocab, (b, seq + 1), generator=gen)
    return (tokens[:, :-1].to(device), positions.to(device), mask.to(device),
            tokens[:, 1:].to(device), loss_mask.to(device))


def train_steps(torch, model, optimizer, batches, steps: int, warmup: int = 2) -> float:
    """Seconds per step after `warmup` steps; `batches(i)` -> (tokens, pos, mask, labels, loss_mask)."""
    from stages.engine.training import optimizer_step, zero_grad

    for i in range(warmup + steps):
        if i == warmup:
            sync(torch)
            t0 = time.perf_counter()
        tokens, pos, mask, labels, loss_mask = batches(i)
        zero_grad(model, optimizer)
        per_token = model(tokens, pos, mask, labels=labels)
        loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
        loss.backward()
        optimizer_step(model, optimizer)
    sync(torch)
    return (time.perf_counter() - t0) / steps


def main() -> dict:
    args = parse_args()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no GPU: run with --cpu-smoke to check the code on CPU")
    from stages.configs.base import MemoryConfig, OptimizerConfig
    from stages.configs.model import ModelConfig, num_params
    from stages.engine import checkpoint as ckpt
    from stages.engine import distributed
    from stages.engine.generate import SamplingConfig, generate
    from stages.engine.model import build_model
    from stages.engine.optim import build_ddp, build_optimizer

    t_start = time.perf_counter()
    model_cfg = ModelConfig(**(TOY if args.cpu_smoke else BILLION))
    vocab, seq, b = (512 if args.cpu_smoke else 32000), model_cfg.seq_length, args.micro_batch
    info = distributed.init(seed=0)
    device = info.device
    # the distributed optimizer at DP=1 is ZeRO-1 over one rank: what is timed is its code path
    memory = MemoryConfig(distributed_optimizer=True, recompute="selective")
    model = build_ddp(build_model(model_cfg, vocab, seq, memory), memory)
    optimizer = build_optimizer(model, OptimizerConfig(), SimpleNamespace(lr_max=3e-4, lr_min=3e-4),
                                memory)
    params = num_params(model_cfg, vocab)
    gen = torch.Generator().manual_seed(0)
    result = {"check": "gpu_check", "cpu_smoke": args.cpu_smoke, "params": params,
              "python": platform.python_version(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "device": (torch.cuda.get_device_name(0)
                                                     if torch.cuda.is_available() else "cpu")}
    import megatron.core

    result["megatron_core"] = megatron.core.__version__
    try:
        import transformer_engine  # noqa: F401
        result["transformer_engine"] = True
    except ImportError:
        result["transformer_engine"] = False

    # --- 1. pretraining ---------------------------------------------------------------------
    mask = causal_mask(torch, seq, device)
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(b, seq)
    ones = torch.ones(b, seq, device=device)

    def pretrain_batch(i):
        t = torch.randint(0, vocab, (b, seq + 1), generator=gen).to(device)
        return t[:, :-1], pos, mask, t[:, 1:], ones

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_s = train_steps(torch, model, optimizer, pretrain_batch, args.steps)
    tokens_s = b * seq / step_s
    flops_per_token = 6 * params + 12 * model_cfg.num_layers * model_cfg.hidden_size * seq
    result["pretrain"] = {"seq": seq, "micro_batch": b, "step_s": round(step_s, 4),
                          "tokens_per_s": round(tokens_s), "mfu": round(
                              tokens_s * flops_per_token / (args.peak_tflops * 1e12), 4)}
    if torch.cuda.is_available():
        result["pretrain"]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)

    # --- 2. packed SFT ----------------------------------------------------------------------
    packed = [packed_batch(torch, b, seq, vocab, device, gen) for _ in range(2)]
    step_s = train_steps(torch, model, optimizer, lambda i: packed[i % 2], args.steps)
    result["sft_packed"] = {"seq": seq, "micro_batch": b, "step_s": round(step_s, 4),
                            "tokens_per_s": round(b * seq / step_s),
                            "loss_tokens_share": round(float(packed[0][4].mean()), 3)}

    # --- 3. GRPO rollout with the KV cache ----------------------------------------------------
    prompt_len = min(128, seq // 4)
    prompts = torch.randint(0, vocab, (args.rollout_batch, prompt_len), generator=gen).tolist()
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=0)
    sync(torch)
    t0 = time.perf_counter()
    out = generate(model, prompts, sampling, stop_ids=set(), vocab_size=vocab)
    sync(torch)
    seconds = time.perf_counter() - t0
    new = sum(len(o) for o in out)
    result["grpo_rollout"] = {"batch": args.rollout_batch, "prompt_tokens": prompt_len,
                              "new_tokens": args.new_tokens, "seconds": round(seconds, 2),
                              "new_tokens_per_s": round(new / seconds)}

    # --- 4. checkpoint save + load --------------------------------------------------------------
    root = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")) / "checkpoints"
    before = ckpt.params_sha256(model)
    sync(torch)
    t0 = time.perf_counter()
    path = ckpt.save_checkpoint(root, 1, model, optimizer, {"step": 1})
    save_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    t0 = time.perf_counter()
    ckpt.load_checkpoint(path, model, optimizer)
    sync(torch)
    load_s = time.perf_counter() - t0
    result["checkpoint"] = {"save_s": round(save_s, 2), "load_s": round(load_s, 2),
                            "gb": round(size / 1e9, 2),
                            "params_equal_after_load": ckpt.params_sha256(model) == before}
    if not args.workdir:
        shutil.rmtree(root.parent, ignore_errors=True)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    distributed.teardown()
    assert math.isfinite(result["pretrain"]["tokens_per_s"])
    return result


if __name__ == "__main__":  # dist_checkpointing's writer spawns a process (notes #9)
    print(json.dumps(main()), flush=True)
