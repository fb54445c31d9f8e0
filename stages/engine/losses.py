"""Every loss of the engine: pretraining's and SFT's token losses, DPD's (DPO + teacher divergence)
and GRPO's (group-relative advantages, clipped policy loss).

Pure torch below the model-calling helpers at the top: the stages feed these from megatron logits,
the tests from small tensors. Shapes: logits [b, s, V] (student and teacher sliced to the same real
vocabulary), labels and loss masks [b, s] with labels[t] the token that follows position t and
mask 1 on response tokens; advantages [b] (GRPO's outcome reward is per sequence and every token of
it shares the advantage).

All maths runs in float32 whatever the logits' dtype: log_softmax over a 100k+ vocabulary in bf16
loses the small probabilities that KL terms are made of.

The DPD definitions follow TRL 1.16 (checked against it in tests/test_distill_loss.py):
  - `dpo_loss` is DPOTrainer's `sigmoid` loss with its reward / margin / accuracy metrics;
  - `token_divergence(kind="jsd")` is GKDTrainer.generalized_jsd_loss summed over the vocabulary.

GRPO's truncated samples: the caller decides. A sample cut at the length limit has no final answer,
so its reward says little; DAPO's "overlong filtering" zeroes its mask row. A fully masked row then
adds nothing to the loss, the stats or (with aggregation="sequence") the number of sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
AGGREGATIONS = ("token", "sequence")


# --- the model's forward pass as losses and logits -----------------------------------------------


def lm_loss(model, batch: dict[str, torch.Tensor], mask) -> torch.Tensor:
    """Mean next-token loss over the tokens the loss mask keeps (pads are masked)."""
    losses = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    loss_mask = batch["loss_mask"].float()
    return (losses.float() * loss_mask).sum() / loss_mask.sum()


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token losses times the loss mask, [b, s]."""
    losses = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"])
    return losses.float() * batch["loss_mask"]


def logits_of(model, batch, vocab_size: int) -> torch.Tensor:
    """[rows, seq, vocab] fp32 logits over the tokenizer's real vocabulary (padding rows cut)."""
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                runtime_gather_output=True)
    return out[..., :vocab_size].float()


# --- per-token log-probs and masked means (DPD and GRPO) ----------------------------------------


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


# --- DPD: sequence-level DPO and token-level divergence from the teacher -------------------------


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


# --- GRPO ----------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """(reward - group mean) [/ (group std + eps)] for rewards [n_groups, G]; same shape.

    The std is the unbiased one (Bessel, divides by G - 1), as in verl's
    compute_grpo_outcome_advantage (torch.std, eps 1e-6 added to the std) and TRL's GRPOTrainer
    (nanstd with Bessel's correction, eps 1e-4). A group with equal rewards gets zero advantages
    (0 / eps), so it carries no gradient. `normalize_std=False` is Dr. GRPO: the std reweights
    prompts by how mixed their outcomes are.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards {tuple(rewards.shape)}: expected [n_groups, G] with G >= 2 "
                         "samples per prompt")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, correction=1) + eps)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, [b, s] (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # a -inf logit (a masked token) has p = 0: clamp so 0 * log 0 is 0, not NaN
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
               normalizer: float | None) -> torch.Tensor:
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if aggregation == "token":
        return per_token.sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    lengths = mask.sum(-1)
    per_seq = per_token.sum(-1) / lengths.clamp(min=1)
    # fully masked rows (filtered overlong samples) are not sequences of this batch
    return per_seq.sum() / (normalizer if normalizer is not None else (lengths > 0).sum().clamp(min=1))


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28,
              aggregation: str = "token", ref_logps: torch.Tensor | None = None, kl_coef: float = 0.0,
              normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip, asymmetric: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, r = pi / pi_old.

    Gradient: the clipped branch is a constant, so a token whose ratio has left the trust region
    *in the direction its advantage pushes* (r > 1 + eps_high with A > 0, r < 1 - eps_low with
    A < 0) gives no gradient; moving the wrong way (e.g. r < 1 - eps_low with A > 0) keeps the full
    gradient so the update can undo it. On the first step of a rollout batch r == 1 and nothing is
    clipped; later steps on the same batch (off-policy) see r != 1. DAPO's eps_high > eps_low lets
    unlikely tokens with A > 0 grow more before clipping (less entropy collapse).

    aggregation "token": sum over all response tokens / their number (DAPO, verl's token-mean: every
    token weighs the same, long answers weigh more); "sequence": mean over each sequence's tokens,
    then over sequences (the GRPO paper). `normalizer` replaces the denominator (tokens or sequences)
    with a global count when a batch is split over micro-batches or data-parallel ranks.

    With `ref_logps` and kl_coef > 0, kl_coef * k3 is added per token, k3 = exp(ref - pi) -
    (ref - pi) - 1, an unbiased, non-negative estimate of KL(pi || ref) on samples from pi (verl's
    `low_var_kl`, with its clamps: log-ratio to +-20, value to 10), aggregated like the PG term.

    Stats (detached scalars over unmasked tokens): pg_loss (without KL), clip_frac (tokens where the
    clipped branch is active), clip_frac_low/high, ratio_mean, approx_kl (k3 estimate of
    KL(pi_old || pi), how far the updates moved the policy from the rollout's), kl_ref whenever
    `ref_logps` is given (logged even with kl_coef = 0).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}: expected one of {AGGREGATIONS}")
    mask = mask.bool()
    adv = advantages.float().unsqueeze(-1)  # [b, 1]: every token of a sample shares its advantage
    # clamp as verl does: exp() of a huge log-ratio of a garbage token must not overflow
    log_ratio = (logps.float() - old_logps.float()).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)
    loss = pg_loss = _aggregate(pg, mask, aggregation, normalizer)

    stats = {}
    if ref_logps is not None:
        ref_log_ratio = (ref_logps.float() - logps.float()).clamp(-20.0, 20.0)
        k3 = (ref_log_ratio.exp() - ref_log_ratio - 1.0).clamp(max=10.0)
        if kl_coef != 0.0:
            loss = loss + kl_coef * _aggregate(k3, mask, aggregation, normalizer)
        stats["kl_ref"] = masked_mean(k3.detach(), mask)

    with torch.no_grad():
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        stats.update(
            pg_loss=pg_loss.detach(),
            clip_frac=masked_mean((high | low).float(), mask),
            clip_frac_high=masked_mean(high.float(), mask),
            clip_frac_low=masked_mean(low.float(), mask),
            ratio_mean=masked_mean(ratio, mask),
            # k3 of KL(old || new) on samples from old: (r - 1) - log r
            approx_kl=masked_mean(ratio - 1.0 - log_ratio, mask),
        )
    return loss, stats
