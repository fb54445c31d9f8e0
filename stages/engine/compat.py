"""Every CPU patch megatron-core 0.16.1 needs, in one place (see shared/notes/megatron-core-on-cpu.md).

megatron-core assumes CUDA in a handful of spots. On a CPU-only torch we:
  - make `torch.cuda.current_device()` answer `torch.device("cpu")`: buffers, DDP grad buffers,
    rotary embeddings and the checkpoint saver all allocate on "the current device" (note #3);
  - no-op `torch.cuda.synchronize()` (checkpoint save, #10) and the cuda RNG get/set used by
    activation recompute (#11);
  - run the FP32 optimizer's init and the grad-norm with `device="cuda"` rewritten to cpu (#6);
  - swap `clip_grad_by_total_norm_fp32` (imported by name into two modules) for a version without
    the `torch.cuda.FloatTensor` assert (#7);
  - import megatron with `torch.compile` as a no-op, as its `disable_jit_fuser()` would leave its
    fused kernels (they never run on CPU), so that a job does not pay for importing dynamo;
  - build the distributed optimizer with cpu fp32 params reported as `torch.cuda.FloatTensor`:
    its constructor sorts params by that type string and refuses any other (the rest of it,
    gloo's reduce-scatter and all-gather included, runs on CPU as it is); and load its
    checkpointed shards under no_grad (fp32 params are their own main params, views of leaves
    that require grad, which its in-place copy refuses; bf16 params get detached fp32 copies).
Dropout RNG (#1/#2) is handled where the seed is set (stages.engine.distributed) and the causal mask (#4)
where the batch is built: both are inputs, not patches.

`apply()` does nothing when CUDA is available, and is idempotent.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_applied = False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda" arguments of torch calls to cpu, for the duration of a call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class _CpuFloatAsCuda(_CudaToCpu):
    """_CudaToCpu, and `tensor.type()` of a cpu tensor answers its cuda type name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str) \
                and not result.startswith("torch.cuda."):
            return "torch.cuda." + result.removeprefix("torch.")
        return result


def _on_cpu(fn, mode=_CudaToCpu):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mode():
            return fn(*args, **kwargs)

    wrapper.__cpu_patched__ = True
    return wrapper


@torch.no_grad()
def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip, minus its cuda-only assert; same coefficient, same in-place scaling."""
    from megatron.core.utils import to_local_if_dtensor

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(getattr(p, attr)).detach() for p in parameters
             if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


_clip_grad_by_total_norm_fp32.__cpu_patched__ = True


@contextlib.contextmanager
def _compile_as_no_op():
    """megatron decorates its fused kernels with torch.compile when they are imported. Nothing is
    compiled on CPU, but the decorator alone imports dynamo and inductor: 3.0 of the 7.0 CPU seconds
    that importing megatron costs every job (measured). Imported under this, the kernels stay plain
    functions, as megatron's own `disable_jit_fuser()` leaves them."""
    compile_ = torch.compile
    torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda f: f)
    try:
        yield
    finally:
        torch.compile = compile_


def apply() -> bool:
    """Patch megatron-core for a CPU-only torch. Returns True when the patches are in place."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    with _compile_as_no_op():
        from megatron.core.models import gpt  # noqa: F401 - imported here for the reason above
        from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    random._set_cuda_rng_state = lambda *a, **k: None

    optimizer.FP32Optimizer.__init__ = _on_cpu(optimizer.FP32Optimizer.__init__)
    distrib_optimizer.DistributedOptimizer.__init__ = _on_cpu(
        distrib_optimizer.DistributedOptimizer.__init__, _CpuFloatAsCuda)
    load_shards = distrib_optimizer.DistributedOptimizer.load_parameter_state_from_dp_reshardable
    distrib_optimizer.DistributedOptimizer.load_parameter_state_from_dp_reshardable = \
        torch.no_grad()(load_shards)
    for module in (clip_grads, optimizer):
        module.get_grad_norm_fp32 = _on_cpu(module.get_grad_norm_fp32)
        module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _applied = True
    return True


def is_applied() -> bool:
    return _applied
