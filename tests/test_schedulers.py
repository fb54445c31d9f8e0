"""FG-WSD learning rate against megatron.core's own WSD scheduler; the phase/mixture schedule."""

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from schedulers.fg_wsd import DECAY_STYLES, PhaseSpec, build_schedule, check
from schedulers.mixture import check_weights, phase_at_tokens, weights_at_tokens

MIX_A, MIX_B, MIX_C = {"web": 0.8, "math": 0.2}, {"web": 0.5, "math": 0.5}, {"web": 0.2, "math": 0.8}


def schedule(phase_tokens, warmup, decay, style="minus_sqrt", gbs=4, seq=8, mixes=None,
             seqs=None, lr_init=0.0):
    mixes = mixes or [MIX_A] * len(phase_tokens)
    seqs = seqs or [seq] * len(phase_tokens)
    specs = [PhaseSpec(f"p{i}", t, m, s, 1e4, gbs) for i, (t, m, s) in
             enumerate(zip(phase_tokens, mixes, seqs))]
    return build_schedule(specs, lr_max=3e-3, lr_min=3e-5, lr_init=lr_init,
                          warmup_tokens=warmup, decay_tokens=decay, decay_style=style), specs


def megatron_lrs(s, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = OptimizerParamScheduler(
        opt, init_lr=s.lr_init, max_lr=s.lr_max, min_lr=s.lr_min, lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=s.total_steps, lr_decay_style="WSD", start_wd=0.0, end_wd=0.0,
        wd_incr_steps=s.total_steps, wd_incr_style="constant", wsd_decay_steps=s.decay_steps,
        lr_wsd_decay_style=s.decay_style)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        sched.step(1)
    return out


@pytest.mark.parametrize("style", DECAY_STYLES)
@pytest.mark.parametrize("phases,warmup,decay,lr_init", [
    ([320, 320, 320, 640], 64, 640, 0.0),       # 4 phases, decay = the last phase
    ([3200, 1600], 320, 800, 1e-4),             # decay inside the last phase, non-zero init lr
    ([96, 96, 96], 0, 96, 0.0),                 # no warmup
    ([6400], 32, 3200, 0.0),                    # one phase: plain WSD
])
def test_lr_equals_megatron_wsd_at_every_step(style, phases, warmup, decay, lr_init):
    s, _ = schedule(phases, warmup, decay, style, lr_init=lr_init)
    ours = [s.lr(step) for step in range(s.total_steps + 3)]
    assert ours == megatron_lrs(s, s.total_steps + 3)  # exact, float for float


def test_longer_sequence_phase_has_fewer_bigger_steps():
    s, _ = schedule([320, 320, 640], 32, 640, seqs=[8, 8, 16])
    assert [(p.start_step, p.steps, p.tokens_per_step) for p in s.phases] == [
        (0, 10, 32), (10, 10, 32), (20, 10, 64)]
    assert s.total_tokens == 1280 and s.decay_steps == 10 and s.warmup_steps == 1
    assert s.tokens_at(25) == 640 + 5 * 64


def test_phase_and_weights_at_token_counts():
    s, _ = schedule([320, 320, 320], 32, 320, mixes=[MIX_A, MIX_B, MIX_C])
    assert phase_at_tokens(s, 0).name == "p0"
    assert phase_at_tokens(s, 319).name == "p0"
    assert phase_at_tokens(s, 320).name == "p1"
    assert phase_at_tokens(s, 10_000).name == "p2"
    assert weights_at_tokens(s, 700, ["web", "math", "code"]) == {"web": 0.2, "math": 0.8, "code": 0.0}
    assert s.phase_at(10).name == "p1" and s.phase_at(29).name == "p2"


def test_mixture_may_change_only_while_lr_is_constant():
    s, specs = schedule([320, 320, 320], 32, 320, mixes=[MIX_A, MIX_B, MIX_C])
    assert check(s, specs, 32, 320) == []
    s, specs = schedule([320, 320, 320], 32, 640, mixes=[MIX_A, MIX_B, MIX_C])  # decay starts at step 10
    (key, msg), = check(s, specs, 32, 640)
    assert key == "phases[2].mixture" and "inside the LR decay" in msg
    s, specs = schedule([320, 320, 320], 400, 320, mixes=[MIX_A, MIX_B, MIX_C])  # warmup past step 10
    (key, msg), = check(s, specs, 400, 320)
    assert key == "phases[1].mixture" and "inside the LR warmup" in msg
    s, specs = schedule([320, 320, 320], 400, 320, mixes=[MIX_A, MIX_A, MIX_C])  # same mix: allowed
    assert check(s, specs, 400, 320) == []


def test_budgets_inconsistent_with_the_schedule():
    s, specs = schedule([320, 330, 10], 32, 320)
    errors = dict(check(s, specs, 32, 320))
    assert "near-whole number of steps" in errors["phases[1].tokens"]
    assert "less than one step" in errors["phases[2].tokens"]
    s, specs = schedule([320, 320], 400, 320)
    assert "exceed the phases' total" in dict(check(s, specs, 400, 320))["lr.decay_tokens"]
    s, specs = schedule([320], 32, 64, style="wavy")
    assert "lr.decay_style" in dict(check(s, specs, 32, 64))


def test_mixture_weights():
    assert check_weights({"a": 0.5, "b": 0.5}) is None
    assert check_weights({"a": 0.5, "b": 0.4}) == "weights sum to 0.9, must sum to 1"
    assert "negative" in check_weights({"a": 1.5, "b": -0.5})
    assert "empty" in check_weights({})
