"""GRPO's pieces: group-relative advantages and the clipped policy loss (with DAPO's clip-higher).

Pure torch: the stage computes log-probs from megatron logits and calls these.
Shapes: logps, old_logps, ref_logps and mask [b, s] over the response tokens, advantages [b] (one
per sample: GRPO's outcome reward is per sequence and every token of it shares the advantage).

Truncated samples: the caller decides. A sample cut at the length limit has no final answer, so
its reward says little; DAPO's "overlong filtering" zeroes its mask row. A fully masked row then
adds nothing to the loss, the stats or (with aggregation="sequence") the number of sequences.
"""

from __future__ import annotations

import torch

from stages.distill_loss import masked_mean

AGGREGATIONS = ("token", "sequence")


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
