"""DPD losses (stages.engine.losses): hand-computed values, JSD limits, DPO gradient sign, top-k, and TRL.

Expected numbers come from python floats (math.log/exp on explicit probabilities), never from the
code under test. The TRL checks call TRL 1.16's own code (pinned in the `test` extra):
  - GKDTrainer.generalized_jsd_loss, a staticmethod, on random logits;
  - DPOTrainer._compute_loss, its real DPO path, on a bare trainer (object.__new__ plus the few
    attributes that path reads) with two tiny random Llama models patched with TRL's fused LM
    head: TRL computes the policy and reference log-probs itself, we compute ours from the same
    models' logits, and loss, gradients and reward metrics must agree.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from stages.engine.losses import (dpo_loss, masked_mean, sequence_logps, token_divergence,
                                  token_divergence_topk, token_logps)

S = [0.5, 0.3, 0.2]  # student probabilities over V = 3
T = [0.1, 0.2, 0.7]  # teacher


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def logits_of(*dists) -> torch.Tensor:
    """[1, len(dists), V] logits whose softmax is each distribution."""
    return torch.tensor([[[math.log(p) for p in d] for d in dists]])


def jsd(p_s, p_t, beta):
    m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


# --- log-probs and DPO ------------------------------------------------------------------------

def test_token_and_sequence_logps():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]])
    labels = torch.tensor([[2, 1, -100]])  # the ignore index sits under the mask
    mask = torch.tensor([[1, 1, 0]])
    lp = token_logps(logits, labels)
    expected = [3 - math.log(math.e + math.e ** 2 + math.e ** 3), -math.log(3)]
    assert lp[0, :2].tolist() == pytest.approx(expected, abs=1e-6)
    assert sequence_logps(lp, mask).item() == pytest.approx(sum(expected), abs=1e-6)
    mean = sequence_logps(lp, mask, length_normalize=True)
    assert mean.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert token_logps(logits.bfloat16(), labels).dtype == torch.float32


def test_dpo_loss_value_and_stats():
    pi_pos, pi_neg = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -1.0])
    ref_pos, ref_neg = torch.tensor([-1.5, -3.0]), torch.tensor([-1.5, -1.5])
    loss, stats = dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, beta=0.1)
    # pair 0: (0.5) - (-0.5) = 1; pair 1: (-1) - (0.5) = -1.5
    # -log sigmoid(x) = log(1 + e^-x)
    expected = [math.log1p(math.exp(-0.1)), math.log1p(math.exp(0.15))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert stats["rewards_chosen"].tolist() == pytest.approx([0.05, -0.1])
    assert stats["rewards_rejected"].tolist() == pytest.approx([-0.05, 0.05])
    assert stats["margins"].tolist() == pytest.approx([0.1, -0.15])
    assert stats["accuracy"].tolist() == [1.0, 0.0]


def test_dpo_step_raises_positive_over_negative():
    """One SGD step on the policy's logits moves log p(pos) - log p(neg) up, by the expected gradient."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)  # row 0: positive answer, row 1: negative
    labels = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    ref = torch.tensor([-6.0, -4.0])

    def gap():
        seq = sequence_logps(token_logps(logits, labels), mask)
        return seq, (seq[0] - seq[1]).item()

    seq, before = gap()
    seq.retain_grad()
    loss, _ = dpo_loss(seq[:1], seq[1:], ref[:1], ref[1:], beta=0.5)
    loss.sum().backward()
    z = 0.5 * ((seq[0] - ref[0]) - (seq[1] - ref[1])).item()
    g = 0.5 / (1 + math.exp(z))  # d/dz -log sigmoid(z) = -sigmoid(-z)
    assert seq.grad.tolist() == pytest.approx([-g, g], abs=1e-6)
    with torch.no_grad():
        logits -= 1.0 * logits.grad
    assert gap()[1] > before


# --- divergences ------------------------------------------------------------------------------

def test_divergences_against_hand_values():
    s, t = logits_of(S), logits_of(T)
    assert token_divergence(s, t, "forward_kl").item() == pytest.approx(kl(T, S), abs=1e-6)
    assert token_divergence(s, t, "reverse_kl").item() == pytest.approx(kl(S, T), abs=1e-6)
    for beta in (0.1, 0.5, 0.9):
        assert token_divergence(s, t, "jsd", beta).item() == pytest.approx(jsd(S, T, beta), abs=1e-6)
    # temperature divides both logits before the softmax
    s2, t2 = softmax([math.log(p) / 2 for p in S]), softmax([math.log(p) / 2 for p in T])
    assert token_divergence(s, t, "forward_kl", temperature=2.0).item() == pytest.approx(kl(t2, s2),
                                                                                        abs=1e-6)
    assert token_divergence(s, t, "jsd", 0.3, 2.0).item() == pytest.approx(jsd(s2, t2, 0.3), abs=1e-6)
    with pytest.raises(ValueError, match="kind"):
        token_divergence(s, t, "tvd")


def test_jsd_limits_and_special_cases():
    s, t = logits_of(S, [0.2, 0.2, 0.6]), logits_of(T, [0.6, 0.3, 0.1])
    fwd, rev = token_divergence(s, t, "forward_kl"), token_divergence(s, t, "reverse_kl")
    # the ends are exactly the KLs (TRL's convention), not the vanishing limits
    assert torch.equal(token_divergence(s, t, "jsd", 0.0), fwd)
    assert torch.equal(token_divergence(s, t, "jsd", 1.0), rev)
    # ... and the scaled limits tend to them, closer as beta approaches the end
    err_fwd = [(token_divergence(s, t, "jsd", b) / b - fwd).abs().max().item() for b in (1e-1, 1e-3)]
    err_rev = [(token_divergence(s, t, "jsd", 1 - b) / b - rev).abs().max().item() for b in (1e-1, 1e-3)]
    assert err_fwd[1] < err_fwd[0] and err_fwd[1] < 1e-2 * fwd.min().item()
    assert err_rev[1] < err_rev[0] and err_rev[1] < 1e-2 * rev.min().item()
    # beta = 0.5: symmetric, bounded by log 2, which nearly disjoint distributions reach
    half = token_divergence(s, t, "jsd", 0.5)
    assert torch.allclose(half, token_divergence(t, s, "jsd", 0.5), atol=1e-7)
    assert (half < math.log(2)).all()
    far = token_divergence(torch.tensor([[[30.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 0.0, 30.0]]]),
                           "jsd", 0.5)
    assert far.item() == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(s, t, "jsd", 1.5)


def test_topk_with_k_equal_v_is_the_full_divergence():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7) * 2
    values, indices = teacher.topk(7, dim=-1)  # every token, in the teacher's order
    logprob_values = torch.log_softmax(teacher, -1).gather(-1, indices)
    for kind, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.2), ("jsd", 0.5)):
        full = token_divergence(student, teacher, kind, beta, temperature=1.5)
        # the teacher's log-probs serve as well as its logits
        for teacher_values in (values, logprob_values):
            topk = token_divergence_topk(student, teacher_values, indices, kind, beta, temperature=1.5)
            assert torch.allclose(topk, full, atol=1e-6), kind


def test_topk_renormalises_on_the_teachers_support():
    s, t = [0.4, 0.1, 0.3, 0.2], [0.1, 0.5, 0.15, 0.25]
    indices = torch.tensor([[[1, 3]]])  # the teacher's top-2
    values = torch.tensor([[[math.log(t[1]), math.log(t[3])]]])
    s_k, t_k = [0.1 / 0.3, 0.2 / 0.3], [0.5 / 0.75, 0.25 / 0.75]
    got = token_divergence_topk(logits_of(s), values, indices, "forward_kl")
    assert got.item() == pytest.approx(kl(t_k, s_k), abs=1e-6)


# --- reductions -------------------------------------------------------------------------------

def test_masked_mean_ignores_masked_nan_and_inf():
    x = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("inf"), 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(4.0)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# --- TRL --------------------------------------------------------------------------------------

def test_jsd_matches_trl_gkd(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(2)
    student, teacher = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = labels[1, 4] = -100
    mask = labels != -100
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for temperature in (1.0, 2.0):
            ours = token_divergence(student, teacher, "jsd", beta, temperature)
            theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta,
                                                     temperature=temperature, reduction="none").sum(-1)
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (beta, temperature)
            batchmean = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta, temperature)
            assert masked_mean(ours, mask).item() == pytest.approx(batchmean.item(), rel=1e-5, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised in TRL's path
def test_dpo_matches_trl_dpo_trainer():
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(4)
    vocab, pairs, length, beta = 17, 3, 9, 0.5
    # a large init range makes the two models disagree clearly (margins far from 0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      initializer_range=0.5)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    # the fields DPOTrainer asks of the fused head for its metrics
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(ref)
    ids = torch.randint(0, vocab, (2 * pairs, length))  # rows: the chosen answers, then the rejected
    completion = torch.zeros_like(ids)
    for row, (start, end) in enumerate([(3, 9), (4, 7), (5, 9), (3, 9), (6, 9), (2, 8)]):
        completion[row, start:end] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}

    trainer = object.__new__(DPOTrainer)  # only the attributes _compute_loss reads on this path
    trainer.__dict__.update(
        model=policy, ref_model=ref, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0],
        f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=False, use_weighting=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                          gather_for_metrics=lambda x: x))
    theirs = trainer._compute_loss(policy, inputs, return_outputs=False)
    theirs.backward()
    their_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    labels, mask = ids[:, 1:], completion[:, 1:]  # position t predicts token t + 1
    seq = sequence_logps(token_logps(policy(ids).logits[:, :-1], labels), mask)
    with torch.no_grad():
        ref_seq = sequence_logps(token_logps(ref(ids).logits[:, :-1], labels), mask)
    loss, stats = dpo_loss(seq[:pairs], seq[pairs:], ref_seq[:pairs], ref_seq[pairs:], beta)
    loss.mean().backward()

    assert loss.mean().item() == pytest.approx(theirs.item(), abs=1e-6)
    assert 0.0 < stats["accuracy"].mean() < 1.0  # a non-trivial case: pairs on both sides of 0
    for ours_p, their_g in zip(policy.parameters(), their_grads):
        assert torch.allclose(ours_p.grad, their_g, rtol=1e-4, atol=1e-5)
    metrics = trainer._metrics["train"]
    for name, key in (("rewards/chosen", "rewards_chosen"), ("rewards/rejected", "rewards_rejected"),
                      ("rewards/margins", "margins"), ("rewards/accuracies", "accuracy")):
        assert metrics[name][0] == pytest.approx(stats[key].mean().item(), abs=1e-5), name
