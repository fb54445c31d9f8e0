"""Losses of Dual Preference Distillation (DPD): sequence-level DPO plus token-level teacher divergence.

Pure torch on purpose: the stage feeds these from megatron logits, the tests from small tensors.
Shapes: logits [b, s, V] (student and teacher sliced to the same real vocabulary), labels and loss
masks [b, s] with labels[t] the token that follows position t and mask 1 on response tokens.

All maths runs in float32 whatever the logits' dtype: log_softmax over a 100k+ vocabulary in bf16
loses the small probabilities that KL terms are made of.

The definitions follow TRL 1.16 (checked against it in tests/test_distill_loss.py):
  - `dpo_loss` is DPOTrainer's `sigmoid` loss with its reward / margin / accuracy metrics;
  - `token_divergence(kind="jsd")` is GKDTrainer.generalized_jsd_loss summed over the vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` where mask == 1; 0, not NaN, when nothing is unmasked (an empty batch still steps)."""
    keep = mask.bool()
    # where, not x * mask: masked positions of a truncated sample may hold inf/NaN
    kept = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() / keep.sum().clamp(min=1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at each position, [b, s]. Labels under the mask may be anything >= -100."""
    logits = logits.float()
    # -100 (the HF ignore index) is read as token 0: the loss mask drops those positions anyway
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor,
                   length_normalize: bool = False) -> torch.Tensor:
    """Sum of response-token log-probs per sequence, [b]; the mean instead when `length_normalize`.

    The sum is the DPO paper's log pi(y|x); the mean removes DPO's pull towards longer (or shorter)
    answers when the pair's lengths differ a lot (SimPO-style), at the price of another beta scale.
    """
    keep = mask.bool()
    total = torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(-1)
    return total / keep.sum(-1).clamp(min=1) if length_normalize else total


def dpo_loss(policy_pos: torch.Tensor, policy_neg: torch.Tensor, ref_pos: torch.Tensor,
             ref_neg: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO per pair, [b]: -log sigmoid(beta * ((pi_pos - ref_pos) - (pi_neg - ref_neg))).

    Inputs are sequence log-probs [b]. Stats are detached per-pair tensors [b] (mean them to log):
    the implicit rewards beta * (pi - ref) of both answers, their margin, and accuracy (margin > 0).
    """
    chosen = policy_pos - ref_pos
    rejected = policy_neg - ref_neg
    loss = -F.logsigmoid(beta * (chosen - rejected))
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
        margins = chosen_rewards - rejected_rewards
        stats = {"rewards_chosen": chosen_rewards, "rewards_rejected": rejected_rewards,
                 "margins": margins, "accuracy": (margins > 0).float()}
    return loss, stats


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, from log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence_from_logps(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                          beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two normalised log-distributions [..., V] -> [...].

    forward_kl = KL(teacher || student): mode-covering, the student spreads over all the teacher's
    answers. reverse_kl = KL(student || teacher): mode-seeking, it may settle on one of them.
    jsd = beta * KL(teacher || m) + (1 - beta) * KL(student || m), m = beta * teacher + (1 - beta) *
    student (GKD's generalised JSD, https://arxiv.org/abs/2306.13649 eq. 1). It is bounded by the
    entropy of (beta, 1 - beta), log 2 at beta = 0.5; jsd / beta -> forward KL as beta -> 0 and
    jsd / (1 - beta) -> reverse KL as beta -> 1. As in TRL, beta == 0 and beta == 1 *are* the
    forward and reverse KL (unscaled), not the vanishing limits, so `jsd` alone can name either end.
    """
    if kind == "forward_kl":
        return _kl(teacher, student)
    if kind == "reverse_kl":
        return _kl(student, teacher)
    if kind != "jsd":
        raise ValueError(f"divergence kind {kind!r}: expected one of {DIVERGENCES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta}: expected 0 <= beta <= 1")
    if beta == 0.0:
        return _kl(teacher, student)
    if beta == 1.0:
        return _kl(student, teacher)
    # the mixture in log space: exp() of both then log() would underflow on small probabilities
    mix = torch.logaddexp(student + math.log1p(-beta), teacher + math.log(beta))
    return beta * _kl(teacher, mix) + (1.0 - beta) * _kl(student, mix)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence of the student from the teacher, [b, s] (see `divergence_from_logps`).

    Both logits are divided by `temperature` (no T^2 rescaling, as in TRL's GKD). The teacher is
    detached: it is a target, never trained through this loss.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return divergence_from_logps(student, teacher, kind, beta)


def token_divergence_topk(student_logits: torch.Tensor, teacher_topk_values: torch.Tensor,
                          teacher_topk_indices: torch.Tensor, kind: str, beta: float = 0.5,
                          temperature: float = 1.0) -> torch.Tensor:
    """`token_divergence` when only the teacher's top-k tokens are known (e.g. a served teacher), [b, s].

    Both distributions are restricted to the teacher's k tokens at each position and renormalised
    there, so the loss compares the *shape* of the two distributions on that support; with k = V it
    is exactly the full divergence. It does not, by itself, penalise student mass outside the
    top-k: TRL's server distillation adds a (k+1)-th "tail" bucket for that instead, which needs the
    teacher's values to be full-vocabulary log-probs. Here `teacher_topk_values` may be the teacher's
    logits or its log-probs on those tokens: renormalising removes the per-position constant.
    """
    idx = teacher_topk_indices.long()
    student = F.log_softmax(student_logits.float().gather(-1, idx) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_topk_values.detach().float() / temperature, dim=-1)
    return divergence_from_logps(student, teacher, kind, beta)
