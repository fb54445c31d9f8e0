"""GRPO pieces (stages.engine.losses) against hand-computed values: advantages, clipping and its
gradient, aggregation, masking, the reference KL and the stats; plus the off-policy case, where
several gradient steps on one rollout batch move the ratio away from 1 until clipping stops them."""

from __future__ import annotations

import math

import pytest
import torch

from stages.engine.losses import grpo_loss, group_advantages, token_entropy

EPS_LOW, EPS_HIGH = 0.2, 0.28

# Four samples of three tokens. Ratios pi / pi_old per token and what PPO-clip makes of them:
#   0  A=+1  1.0 inside     1.5 > 1.28: clipped, no grad    0.5 < 0.8 but A > 0: unclipped
#   1  A=-1  1.1 inside     0.5 < 0.8: clipped, no grad     1.5 > 1.28 but A < 0: unclipped
#   2  A=+2  0.9 inside, then two masked tokens
#   3  A=+1  fully masked (a truncated sample the caller filtered out)
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.5, 1.5], [0.9, 7.0, 9.0], [2.0, 3.0, 4.0]]
ADV = [1.0, -1.0, 2.0, 1.0]
MASK = [[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]]
# -min(r A, clip(r) A) on the unmasked tokens
PER_TOKEN = [[-1.0, -1.28, -0.5], [1.1, 0.8, 1.5], [-1.8]]
# d loss_token / d logp = -r A where the unclipped branch is active, 0 where the clipped one is
GRAD_NUMERATOR = [[-1.0, 0.0, -0.5], [1.1, 0.0, 1.5], [-1.8, 0.0, 0.0], [0.0, 0.0, 0.0]]


def flat(rows) -> list[float]:
    return [x for row in rows for x in (row.tolist() if torch.is_tensor(row) else row)]


def batch():
    old = torch.full((4, 3), -2.0)
    logps = (old + torch.tensor(RATIOS).log()).requires_grad_()
    return logps, old, torch.tensor(ADV), torch.tensor(MASK)


# --- advantages -------------------------------------------------------------------------------

def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    adv = group_advantages(rewards, normalize_std=True)
    # unbiased std: group 0 sqrt((4 * 0.25) / 3), group 2 sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)
    s0, s2 = math.sqrt(1 / 3), math.sqrt(5 / 3)
    assert adv[0].tolist() == pytest.approx([0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: zero, not NaN
    assert adv[2].tolist() == pytest.approx([-1.5 / s2, -0.5 / s2, 0.5 / s2, 1.5 / s2], abs=1e-5)
    plain = group_advantages(rewards, normalize_std=False)
    assert flat(plain) == pytest.approx([0.5, -0.5, -0.5, 0.5] + [0.0] * 4 + [-1.5, -0.5, 0.5, 1.5])
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_token_entropy():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],
                            [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]]])
    assert flat(token_entropy(logits)) == pytest.approx([math.log(4), 1.5 * math.log(2)], abs=1e-6)


# --- the clipped loss -------------------------------------------------------------------------

def test_clipped_loss_values_and_gradient_token_aggregation():
    logps, old, adv, mask = batch()
    loss, stats = grpo_loss(logps, old, adv, mask, EPS_LOW, EPS_HIGH, aggregation="token")
    n = 7  # unmasked tokens
    assert loss.item() == pytest.approx(sum(map(sum, PER_TOKEN)) / n, abs=1e-6)
    loss.backward()
    # zero where clipping is active and on masked tokens, -r A / n elsewhere
    assert flat(logps.grad) == pytest.approx([g / n for g in flat(GRAD_NUMERATOR)], abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / n)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / n)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / n)
    ratios = [1.0, 1.5, 0.5, 1.1, 0.5, 1.5, 0.9]
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / n, abs=1e-6)
    k3 = [r - 1 - math.log(r) for r in ratios]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / n, abs=1e-6)
    assert stats["pg_loss"].item() == pytest.approx(loss.item())
    assert "kl_ref" not in stats


def test_sequence_aggregation_weighs_sequences_not_tokens():
    logps, old, adv, mask = batch()
    loss, _ = grpo_loss(logps, old, adv, mask, EPS_LOW, EPS_HIGH, aggregation="sequence")
    per_seq = [sum(row) / len(row) for row in PER_TOKEN]
    # the fully masked sample is not a sequence of the batch
    assert loss.item() == pytest.approx(sum(per_seq) / 3, abs=1e-6)
    token_loss, _ = grpo_loss(logps, old, adv, mask, EPS_LOW, EPS_HIGH, aggregation="token")
    # unequal lengths: the short sample weighs more here than under token aggregation
    assert abs(loss.item() - token_loss.item()) > 0.1
    loss.backward()
    lengths = [3, 3, 1, 1]
    expected = [[g / lengths[i] / 3 for g in row] for i, row in enumerate(GRAD_NUMERATOR)]
    assert flat(logps.grad) == pytest.approx(flat(expected), abs=1e-6)
    # with equal lengths the two aggregations agree
    full = torch.ones(4, 3, dtype=torch.long)
    a = grpo_loss(logps, old, adv, full, EPS_LOW, EPS_HIGH, aggregation="token")[0]
    b = grpo_loss(logps, old, adv, full, EPS_LOW, EPS_HIGH, aggregation="sequence")[0]
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logps, old, adv, mask, aggregation="batch")


def test_masked_tokens_contribute_nothing():
    logps, old, adv, mask = batch()
    ref, _ = grpo_loss(logps, old, adv, mask, EPS_LOW, EPS_HIGH)
    garbage = logps.detach().clone()
    garbage[~mask.bool()] = 60.0  # huge log-ratios where masked: clamped, then dropped
    other, stats = grpo_loss(garbage, old, adv, mask, EPS_LOW, EPS_HIGH)
    assert other.item() == ref.item()
    assert math.isfinite(stats["ratio_mean"].item()) and math.isfinite(stats["approx_kl"].item())
    # the caller's normalizer replaces the local token count (micro-batches, data-parallel ranks)
    half, _ = grpo_loss(logps, old, adv, mask, EPS_LOW, EPS_HIGH, normalizer=14)
    assert half.item() == pytest.approx(ref.item() / 2)


def test_reference_kl_term():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -2.5, -3.0]])  # ref - logp = 0.5, -0.5, 0
    mask = torch.tensor([[1, 1, 0]])
    k3 = [math.exp(0.5) - 0.5 - 1, math.exp(-0.5) + 0.5 - 1]
    # advantage 0: only the KL term moves the loss
    loss, stats = grpo_loss(logps, logps.detach(), torch.zeros(1), mask, ref_logps=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, abs=1e-7)
    assert stats["kl_ref"].item() == pytest.approx(sum(k3) / 2, abs=1e-7)
    loss.backward()
    # d k3 / d logp = -(exp(ref - logp) - 1): pulls logp towards ref
    expected = [-0.1 * (math.exp(0.5) - 1) / 2, -0.1 * (math.exp(-0.5) - 1) / 2, 0.0]
    assert flat(logps.grad) == pytest.approx(expected, abs=1e-7)
    logged, stats = grpo_loss(logps, logps.detach(), torch.zeros(1), mask, ref_logps=ref, kl_coef=0.0)
    assert logged.item() == 0.0 and stats["kl_ref"].item() == pytest.approx(sum(k3) / 2, abs=1e-7)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_off_policy_steps_stop_at_the_clip(advantage):
    """Many SGD steps on one rollout: the first is the plain policy gradient (ratio 1), later ones
    see ratio != 1, and once the ratio leaves the trust region in the advantage's direction the
    gradient vanishes and the policy stops moving."""
    logits = torch.tensor([[[0.5, 0.0, -0.5, 0.2]]], requires_grad=True)  # one token, V = 4
    token = torch.tensor([[2]])
    mask = torch.ones(1, 1)

    def logp():
        return torch.log_softmax(logits, -1).gather(-1, token.unsqueeze(-1)).squeeze(-1)

    old = logp().detach()
    ratios, moved = [], []
    for step in range(15):
        loss, stats = grpo_loss(logp(), old, torch.tensor([advantage]), mask, EPS_LOW, EPS_HIGH)
        ratios.append(stats["ratio_mean"].item())
        logits.grad = None
        loss.backward()
        if step == 0:  # on-policy: -A * d log p / d logits
            p = torch.softmax(logits.detach(), -1)
            expected = -advantage * (torch.nn.functional.one_hot(token, 4).float() - p)
            assert torch.allclose(logits.grad, expected, atol=1e-6)
        moved.append(logits.grad.abs().sum().item() > 0)
        with torch.no_grad():
            logits -= 0.05 * logits.grad
    stopped = moved.index(False)  # the first step without gradient
    assert 1 < stopped and not any(moved[stopped:])
    assert ratios[0] == 1.0 and len(set(ratios[stopped:])) == 1  # moved off 1, then frozen
    if advantage > 0:
        assert all(1.0 <= r <= 1 + EPS_HIGH for r in ratios[:stopped]) and ratios[stopped] > 1 + EPS_HIGH
    else:
        assert all(1 - EPS_LOW <= r <= 1.0 for r in ratios[:stopped]) and ratios[stopped] < 1 - EPS_LOW
    assert stats["clip_frac"].item() == 1.0
