"""Megatron DDP, optimizer and LR scheduler for a GPTModel, from the stage config and FG-WSD schedule."""

from __future__ import annotations

import importlib.util

import torch

from schedulers.fg_wsd import FGWSDSchedule
from stages.configs.base import MemoryConfig, OptimizerConfig


def check_memory_savers(memory: MemoryConfig, tensor_parallel: int = 1) -> None:
    """Refuse, naming the recipe key, a saver this machine or this engine cannot honour, rather
    than run without it (a silent no-op would only show as an out-of-memory on the cluster)."""
    cuda = torch.cuda.is_available()
    if memory.optimizer_cpu_offload and not cuda:
        raise ValueError("memory.optimizer_cpu_offload: needs CUDA (Megatron's HybridDeviceOptimizer "
                         "moves optimizer states between GPU and CPU); set it false on a CPU run")
    if memory.grad_reduce_in_bf16 and not cuda:
        raise ValueError("memory.grad_reduce_in_bf16: a CPU run trains in fp32, so there are no bf16 "
                         "gradients to reduce; set it false on a CPU run")
    if memory.sequence_parallel and tensor_parallel == 1:
        raise ValueError("memory.sequence_parallel: needs parallel.tensor > 1 (it splits the "
                         "tensor-parallel ranks' activations along the sequence)")
    if memory.context_parallel > 1:
        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError("memory.context_parallel: needs TransformerEngine (its attention splits "
                             "a sequence over ranks); install transformer_engine or set it to 1")
        raise ValueError("memory.context_parallel: the training loops do not yet split their "
                         "batches over context-parallel ranks; set it to 1")


def build_ddp(model, memory: MemoryConfig | None = None):
    """Wrap in Megatron DDP: grads accumulate in fp32 buffers (bf16 with grad_reduce_in_bf16)
    and are averaged, or reduce-scattered for the distributed optimizer, over the data-parallel
    ranks by `finish_grad_sync()`, or bucket by bucket during backward with overlap_grad_reduce."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    memory = memory or MemoryConfig()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not memory.grad_reduce_in_bf16,
        overlap_grad_reduce=memory.overlap_grad_reduce,
        overlap_param_gather=memory.overlap_param_gather,
        use_distributed_optimizer=memory.distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model, opt_cfg: OptimizerConfig, schedule: FGWSDSchedule,
                    memory: MemoryConfig | None = None):
    """Megatron's Adam (AdamW-style decoupled weight decay; no decay on norms). fp32 on CPU:
    the mixed-precision optimizer needs CUDA tensors. With distributed_optimizer each
    data-parallel rank keeps and steps 1/DP of the fp32 main params and moments."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    memory = memory or MemoryConfig()
    bf16 = torch.cuda.is_available()
    config = MegatronOptimizerConfig(
        optimizer="adam", lr=schedule.lr_max, min_lr=schedule.lr_min,
        weight_decay=opt_cfg.weight_decay, adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps, clip_grad=opt_cfg.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=memory.distributed_optimizer,
        # Megatron-LM's --optimizer-cpu-offload goes with the precision-aware optimizer
        optimizer_cpu_offload=memory.optimizer_cpu_offload,
        optimizer_offload_fraction=memory.optimizer_offload_fraction,
        use_precision_aware_optimizer=memory.optimizer_cpu_offload)
    optimizer = get_megatron_optimizer(config, [model])
    if memory.distributed_optimizer:
        _make_states_now(optimizer)
        _restore_steps_on_load(optimizer)
    return optimizer


def _restore_steps_on_load(optimizer) -> None:
    """megatron-core 0.16.1's distributed optimizer over torch's Adam (no TransformerEngine/apex)
    saves the step count in its param groups, and on load puts one shared `step` tensor in every
    param's state, then overwrites it with the per-param shard's (zero) while restoring the
    moments: a resumed run would restart Adam's bias correction. Give each param its own step,
    the saved one."""
    for inner in _over_torch_adam(optimizer):
        def load_state_dict(state_dict, load=inner.load_state_dict, adam=inner.optimizer):
            load(state_dict)
            for group in adam.param_groups:
                if "step" in group:
                    for param in group["params"]:
                        adam.state[param]["step"] = torch.tensor(float(group["step"]))

        inner.load_state_dict = load_state_dict


def _over_torch_adam(optimizer) -> list:
    """The distributed optimizers inside `optimizer` that step torch's Adam (TransformerEngine's
    and apex's FusedAdam keep their step elsewhere; megatron-core handles those itself)."""
    return [inner for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            if type(inner.optimizer) in (torch.optim.Adam, torch.optim.AdamW)]


def _make_states_now(optimizer) -> None:
    """Give every param its Adam state (step 0, zero moments: what torch's Adam makes at its first
    step) before any step. Loading a checkpoint into megatron-core 0.16.1's distributed optimizer
    over torch's Adam (no TransformerEngine/apex) reads one `step` from the states it holds, and
    fails (`assert len(steps) == 1`) on a fresh one; its own init_state_fn makes no step."""
    for inner in _over_torch_adam(optimizer):
        adam = inner.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param].update(step=torch.tensor(0.0),
                                             exp_avg=torch.zeros_like(param),
                                             exp_avg_sq=torch.zeros_like(param))


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
