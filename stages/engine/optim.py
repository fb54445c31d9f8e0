"""Megatron DDP, optimizer and LR scheduler for a GPTModel, from the stage config and FG-WSD schedule."""

from __future__ import annotations

import torch

from schedulers.fg_wsd import FGWSDSchedule
from stages.configs.base import OptimizerConfig


def build_ddp(model):
    """Wrap in Megatron DDP: grads accumulate in fp32 buffers and are averaged over data-parallel
    ranks by `finish_grad_sync()` (no overlap: on CPU there is nothing to overlap with)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model, opt_cfg: OptimizerConfig, schedule: FGWSDSchedule):
    """Megatron's Adam (AdamW-style decoupled weight decay; no decay on norms). fp32 on CPU:
    the mixed-precision optimizer needs CUDA tensors."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    bf16 = torch.cuda.is_available()
    config = MegatronOptimizerConfig(
        optimizer="adam", lr=schedule.lr_max, min_lr=schedule.lr_min,
        weight_decay=opt_cfg.weight_decay, adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps, clip_grad=opt_cfg.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=False)
    return get_megatron_optimizer(config, [model])


def build_scheduler(optimizer, schedule: FGWSDSchedule, weight_decay: float, step: int = 0):
    """Megatron's WSD scheduler placed on the FG-WSD schedule, advanced to `step`.

    Built fresh and stepped to the restored step instead of load_state_dict(): that adds the saved
    step count to the current one, and its state_dict() omits the WSD settings.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total = schedule.total_steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=schedule.lr_init, max_lr=schedule.lr_max, min_lr=schedule.lr_min,
        lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=total, lr_decay_style="WSD",
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=total,
        wd_incr_style="constant", wsd_decay_steps=schedule.decay_steps,
        lr_wsd_decay_style=schedule.decay_style)
    if step:
        scheduler.step(step)
    return scheduler


def current_lr(optimizer) -> float:
    return optimizer.param_groups[0]["lr"]
