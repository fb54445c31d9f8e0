"""FG-WSD: fine-grained warmup-stable-decay, as pure functions of the step.

The run is a list of phases, each a token budget with its own data mixture (and optionally its own
sequence length and RoPE base). The learning rate does not know about phases: it warms up linearly
over `warmup_tokens`, stays at `max` and decays over the last `decay_tokens`, with the decay shapes
Megatron's WSD scheduler defines. `lr(step)` equals megatron.core's OptimizerParamScheduler
("WSD", lr_warmup_steps=W, lr_decay_steps=T, wsd_decay_steps=D) at every step; the tests check it.

Tokens become steps per phase: `round(tokens / (global_batch * seq_length))`; a phase may change
both (a long-context decay usually takes fewer, longer sequences per step). No megatron import here: `pipeline plan` uses this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
ROUNDING_TOLERANCE = 0.01  # a budget may move by at most 1% when rounded to whole steps


@dataclass(frozen=True)
class PhaseSpec:
    """A phase as the recipe states it (token budget), before it is laid out in steps."""

    name: str
    tokens: float
    mixture: Mapping[str, float]
    seq_length: int
    rotary_base: float
    global_batch_size: int


@dataclass(frozen=True)
class Phase:
    """A phase laid out in steps: it covers steps [start_step, end_step)."""

    index: int
    name: str
    start_step: int
    steps: int
    seq_length: int
    rotary_base: float
    global_batch_size: int
    """Sequences per step in this phase (long-context phases usually take fewer)."""
    tokens_per_step: int
    start_tokens: int
    mixture: tuple[tuple[str, float], ...]

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.mixture)


@dataclass(frozen=True)
class FGWSDSchedule:
    phases: tuple[Phase, ...]
    warmup_steps: int
    decay_steps: int
    lr_max: float
    lr_min: float
    lr_init: float
    decay_style: str

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end_step

    @property
    def total_tokens(self) -> int:
        return self.tokens_at(self.total_steps)

    @property
    def decay_start_step(self) -> int:
        return self.total_steps - self.decay_steps

    def lr(self, step: int) -> float:
        """The learning rate used by optimizer step `step` (0-based)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr_init + (self.lr_max - self.lr_init) * float(step) / float(self.warmup_steps)
        if step > self.total_steps:
            return self.lr_min
        if step <= self.decay_start_step:
            return self.lr_max
        done = float(step - self.decay_start_step) / float(self.decay_steps)
        return self.lr_min + decay_coeff(self.decay_style, done) * (self.lr_max - self.lr_min)

    def phase_at(self, step: int) -> Phase:
        """The phase that optimizer step `step` belongs to (the last one past the end)."""
        for phase in self.phases:
            if step < phase.end_step:
                return phase
        return self.phases[-1]

    def tokens_at(self, step: int) -> int:
        """Tokens consumed before optimizer step `step`."""
        phase = self.phase_at(step)
        return phase.start_tokens + (min(step, phase.end_step) - phase.start_step) * phase.tokens_per_step

    def step_at_tokens(self, tokens: float) -> int:
        """The first step boundary at or nearest to a token count (rounded within its phase)."""
        for phase in self.phases:
            if tokens <= phase.start_tokens + phase.tokens:
                return phase.start_step + round((tokens - phase.start_tokens) / phase.tokens_per_step)
        return self.total_steps


def decay_coeff(style: str, done: float) -> float:
    """Share of (max - min) left after `done` (0..1) of the decay, per Megatron's WSD styles."""
    if style == "linear":
        return 1.0 - done
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * done) + 1.0)
    if style == "exponential":
        return 2.0 * math.pow(0.5, done) - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(done)
    raise ValueError(f"unknown decay style {style!r}; one of {', '.join(DECAY_STYLES)}")


def build_schedule(phases: Sequence[PhaseSpec], *, lr_max: float,
                   lr_min: float, lr_init: float, warmup_tokens: float, decay_tokens: float,
                   decay_style: str) -> FGWSDSchedule:
    """Lay the phases out in steps and place warmup and decay on them. Call `check` for errors."""
    laid: list[Phase] = []
    step = tokens = 0
    for i, p in enumerate(phases):
        tps = p.global_batch_size * p.seq_length
        steps = max(int(round(p.tokens / tps)), 0)
        laid.append(Phase(i, p.name, step, steps, p.seq_length, p.rotary_base, p.global_batch_size,
                          tps, tokens, tuple(sorted(p.mixture.items()))))
        step += steps
        tokens += steps * tps
    draft = FGWSDSchedule(tuple(laid), 0, 0, lr_max, lr_min, lr_init, decay_style)
    warmup = draft.step_at_tokens(warmup_tokens)
    decay = draft.total_steps - draft.step_at_tokens(max(draft.total_tokens - decay_tokens, 0))
    return FGWSDSchedule(tuple(laid), warmup, decay, lr_max, lr_min, lr_init, decay_style)


def check(schedule: FGWSDSchedule, phases: Sequence[PhaseSpec], warmup_tokens: float,
          decay_tokens: float) -> list[tuple[str, str]]:
    """Inconsistencies as (key relative to the stage config, message); empty when all is well."""
    errors: list[tuple[str, str]] = []
    if schedule.decay_style not in DECAY_STYLES:
        errors.append(("lr.decay_style", f"{schedule.decay_style!r} is not one of "
                                         f"{', '.join(DECAY_STYLES)}"))
    if not phases:
        return errors + [("phases", "at least one phase is needed")]
    for phase, spec in zip(schedule.phases, phases):
        key = f"phases[{phase.index}].tokens"
        if phase.steps < 1:
            errors.append((key, f"{spec.tokens:g} tokens is less than one step "
                                f"({phase.tokens_per_step} tokens = global_batch_size "
                                f"{phase.global_batch_size} x seq_length {phase.seq_length})"))
        elif abs(phase.tokens - spec.tokens) > ROUNDING_TOLERANCE * spec.tokens:
            errors.append((key, f"{spec.tokens:g} tokens is {spec.tokens / phase.tokens_per_step:.2f} "
                                f"steps of {phase.tokens_per_step} tokens; make it a near-whole "
                                "number of steps"))
    total = sum(p.tokens for p in phases)
    for key, value in (("lr.warmup_tokens", warmup_tokens), ("lr.decay_tokens", decay_tokens)):
        if value < 0:
            errors.append((key, f"{value:g} must be >= 0"))
    if warmup_tokens + decay_tokens > total:
        errors.append(("lr.decay_tokens", f"warmup ({warmup_tokens:g}) + decay ({decay_tokens:g}) "
                                          f"tokens exceed the phases' total of {total:g}"))
    elif decay_tokens > 0 and schedule.decay_steps < 1:
        errors.append(("lr.decay_tokens", f"{decay_tokens:g} tokens is less than one step"))
    if schedule.lr_min > schedule.lr_max:
        errors.append(("lr.min", f"{schedule.lr_min:g} is above lr.max {schedule.lr_max:g}"))
    if errors:
        return errors
    # The paper's rule: the mixture changes only while the LR is constant, i.e. at a phase
    # boundary between the end of warmup and the start of decay.
    for prev, phase in zip(schedule.phases, schedule.phases[1:]):
        if prev.mixture == phase.mixture:
            continue
        b = phase.start_step
        if b < schedule.warmup_steps or b > schedule.decay_start_step:
            where = "warmup" if b < schedule.warmup_steps else "decay"
            errors.append((f"phases[{phase.index}].mixture",
                           f"the mixture changes at step {b}, inside the LR {where} "
                           f"(constant LR spans steps {schedule.warmup_steps}.."
                           f"{schedule.decay_start_step}); mixtures may change only while the "
                           "LR is constant"))
    return errors


def phase_specs(cfg, model) -> list[PhaseSpec]:
    """A pretrain config's phases with the model's defaults filled in (seq length, RoPE base) and
    the stage's global batch size where a phase sets none. `cfg` is a stages PretrainConfig and
    `model` a ModelConfig, read by attribute (this package imports nothing of ours)."""
    return [PhaseSpec(p.name, float(p.tokens), dict(p.mixture), p.seq_length or model.seq_length,
                      p.rotary_base or model.rotary_base,
                      p.global_batch_size or cfg.global_batch_size) for p in cfg.phases]


def pretrain_schedule(cfg, model) -> FGWSDSchedule:
    """The FG-WSD schedule (phases in steps, LR) that a pretrain config describes."""
    return build_schedule(phase_specs(cfg, model), lr_max=cfg.lr.max,
                          lr_min=cfg.lr.min, lr_init=cfg.lr.init,
                          warmup_tokens=float(cfg.lr.warmup_tokens),
                          decay_tokens=float(cfg.lr.decay_tokens), decay_style=cfg.lr.decay_style)
