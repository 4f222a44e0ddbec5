"""Each loss against a deliberately naive float64 version written here: loops over batch and tokens."""

import math

import pytest
import torch

from lightning_align.losses import pairwise_reward_loss, sequence_logps, sft_loss


def naive_token_logps(logits, labels):
    """log softmax written out per position, label t predicted from position t-1."""
    out = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(1, logits.shape[1]):
            if labels[b, t] == -100:
                continue
            scores = logits[b, t - 1]
            log_norm = torch.log(sum(torch.exp(s) for s in scores))
            row.append(scores[labels[b, t]] - log_norm)
        out.append(row)
    return out


def random_batch(seed=0, batch=3, seq=7, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :2] = -100  # a prompt
    labels[0, -2:] = -100  # padding
    labels[2, 3] = -100  # a hole
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_naive_loop_with_gradients(average):
    logits, labels = random_batch()
    ours_logits = logits.clone().requires_grad_(True)
    ref_logits = logits.clone().requires_grad_(True)
    ours = sequence_logps(ours_logits, labels, average=average)
    per_seq = naive_token_logps(ref_logits, labels)
    ref = torch.stack([sum(r) / (len(r) if average else 1) for r in per_seq])
    torch.testing.assert_close(ours, ref)
    weights = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad)


def test_sft_loss_is_mean_nll_over_scored_tokens_with_gradients():
    logits, labels = random_batch(seed=1)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = sft_loss(a, labels)
    tokens = [lp for row in naive_token_logps(b, labels) for lp in row]
    ref = -sum(tokens) / len(tokens)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_sft_loss_with_external_normaliser_divides_the_sum_by_it():
    logits, labels = random_batch(seed=2)
    tokens = [lp for row in naive_token_logps(logits, labels) for lp in row]
    torch.testing.assert_close(sft_loss(logits, labels, num_scored_tokens=40), -sum(tokens) / 40)


@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_reward_loss_matches_bradley_terry_formula(with_margin):
    g = torch.Generator().manual_seed(3)
    chosen = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(5, generator=g, dtype=torch.float64) if with_margin else None
    ours = pairwise_reward_loss(chosen, rejected, margin)
    ref = 0.0
    for i in range(5):
        gap = chosen[i] - rejected[i] - (margin[i] if with_margin else 0.0)
        ref = ref - torch.log(1 / (1 + torch.exp(-gap)))
    ref = ref / 5
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours, (chosen, rejected))
    ref_grads = torch.autograd.grad(ref, (chosen, rejected))
    for g_ours, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g_ours, g_ref)
    assert math.isfinite(ours.item())
