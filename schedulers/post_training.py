"""The post-training stages' learning rate (SFT, distill, RL): warmup steps, then decay."""

from __future__ import annotations

from schedulers.fg_wsd import FGWSDSchedule, PhaseSpec, build_schedule


def post_training_schedule(lr, steps: int, global_batch_size: int, seq_length: int,
                           rotary_base: float) -> FGWSDSchedule:
    """A one-phase FG-WSD schedule: `lr.warmup_steps` of linear warmup, then decay (`lr.decay_style`)
    from `lr.max` to `lr.min` over all the remaining steps. `lr` is a PostTrainingLRConfig, read by
    attribute. Megatron's WSD scheduler then drives the optimizer on it, as in pretraining."""
    tps = global_batch_size * seq_length
    phase = PhaseSpec("sft", steps * tps, {"sft": 1.0}, seq_length, rotary_base, global_batch_size)
    warmup = max(0, min(lr.warmup_steps, steps - 1))  # Megatron needs a decay step after it
    return build_schedule([phase], lr_max=lr.max, lr_min=lr.min, lr_init=0.0,
                          warmup_tokens=warmup * tps, decay_tokens=(steps - warmup) * tps,
                          decay_style=lr.decay_style)
