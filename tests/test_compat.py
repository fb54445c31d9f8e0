"""The CPU compat layer: applied only without CUDA, idempotent, and numerically what it replaces."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from stages.engine import compat


def test_not_applied_when_cuda_is_reported_available():
    # a fresh interpreter: nothing has patched megatron yet, whatever ran before in this process
    script = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron.core.optimizer import clip_grads, optimizer
        from megatron.core.tensor_parallel import random
        targets = lambda: [torch.cuda.current_device, torch.cuda.synchronize,
                           random._get_cuda_rng_state, random._set_cuda_rng_state,
                           optimizer.FP32Optimizer.__init__, clip_grads.get_grad_norm_fp32,
                           optimizer.get_grad_norm_fp32, clip_grads.clip_grad_by_total_norm_fp32,
                           optimizer.clip_grad_by_total_norm_fp32]
        before = targets()
        from stages.engine import compat
        assert compat.apply() is False
        assert compat.is_applied() is False
        assert all(a is b for a, b in zip(before, targets())), "something was patched"
        print("untouched")
    """)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "untouched" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_applied_on_cpu_and_idempotent():
    from megatron.core.optimizer import clip_grads, optimizer

    assert compat.apply() is True
    patched = (torch.cuda.current_device, optimizer.FP32Optimizer.__init__,
               clip_grads.get_grad_norm_fp32, optimizer.clip_grad_by_total_norm_fp32)
    assert compat.apply() is True
    assert patched == (torch.cuda.current_device, optimizer.FP32Optimizer.__init__,
                       clip_grads.get_grad_norm_fp32, optimizer.clip_grad_by_total_norm_fp32)
    assert torch.cuda.current_device() == torch.device("cpu")
    assert getattr(optimizer.FP32Optimizer.__init__, "__cpu_patched__", False)
    assert clip_grads.clip_grad_by_total_norm_fp32 is optimizer.clip_grad_by_total_norm_fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_grad_norm_and_clip_match_torch(megatron_world):
    from megatron.core.optimizer import clip_grads

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    reference = [p.grad.clone() for p in params]
    norm = clip_grads.get_grad_norm_fp32([p.grad for p in params])
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    expected_norm = torch.nn.utils.clip_grad_norm_([_with_grad(g) for g in reference], max_norm=1.0)
    assert norm == pytest.approx(float(expected_norm), rel=1e-5)
    clipped = torch.cat([p.grad.flatten() for p in params])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-4)


def _with_grad(grad: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    return p
