"""PPO estimators against naive float64 versions with explicit loops, masked positions and gradients included."""

import math

import pytest
import torch

from lightning_align.losses import gae, kl_penalty, ppo_policy_loss, ppo_value_loss, whiten

B, T = 3, 6


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 4:] = 0  # responses of different lengths, right-padded
    mask[2, 2:] = 0

    def rand():
        return torch.randn(B, T, generator=g, dtype=torch.float64)

    return rand, mask


def masked_entries(x, mask):
    return [x[b, t] for b in range(B) for t in range(T) if mask[b, t] == 1]


def test_gae_matches_backward_recursion_per_sequence():
    rand, mask = batch(0)
    rewards, values = rand(), rand()
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        length = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1].item() if t + 1 < length else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            assert advantages[b, t].item() == pytest.approx(running)
            assert returns[b, t].item() == pytest.approx(running + values[b, t].item())
        for t in range(length, T):
            assert advantages[b, t] == 0 and returns[b, t] == 0


def test_gae_steps_over_masked_gaps_as_over_the_unmasked_tokens_alone():
    # A multi-turn episode: the environment's tokens (0s inside the mask) are not steps of the policy.
    rand, _ = batch(2)
    rewards, values = rand(), rand()
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        steps = [t for t in range(T) if mask[b, t] == 1]
        running = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_value = values[b, steps[k + 1]].item() if k + 1 < len(steps) else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            assert advantages[b, t].item() == pytest.approx(running)
            assert returns[b, t].item() == pytest.approx(running + values[b, t].item())
        for t in set(range(T)) - set(steps):
            assert advantages[b, t] == 0 and returns[b, t] == 0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_uses_masked_mean_and_unbiased_variance(shift_mean):
    rand, mask = batch(1)
    x = rand()
    entries = masked_entries(x, mask)
    mean = sum(entries) / len(entries)
    variance = sum((e - mean) ** 2 for e in entries) / (len(entries) - 1)
    out = whiten(x, mask, shift_mean)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                expected = (x[b, t] - mean) / math.sqrt(variance + 1e-8) + (0 if shift_mean else mean)
                assert out[b, t].item() == pytest.approx(expected.item())


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_match_their_formulas_with_gradients(kind):
    rand, _ = batch(2)
    logprobs, ref = rand().requires_grad_(True), rand()
    out = kl_penalty(logprobs, ref, kind)
    naive = torch.empty_like(out)
    for b in range(B):
        for t in range(T):
            d = logprobs[b, t] - ref[b, t]
            naive[b, t] = {"k1": d, "k2": d * d / 2, "k3": math.e ** (-d) - 1 + d}[kind]
    torch.testing.assert_close(out, naive)
    torch.testing.assert_close(
        torch.autograd.grad(out.sum(), logprobs)[0], torch.autograd.grad(naive.sum(), logprobs)[0]
    )


def test_k3_is_never_negative_while_k1_can_be_and_all_vanish_at_equality():
    rand, _ = batch(3)
    logprobs, ref = rand(), rand()
    assert (kl_penalty(logprobs, ref, "k1") < 0).any()
    assert (kl_penalty(logprobs, ref, "k3") >= 0).all()
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(ref, ref, kind), torch.zeros_like(ref))
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(ref, ref, "k4")


def test_ppo_policy_loss_matches_per_token_clipped_surrogate_with_gradients():
    rand, mask = batch(4)
    old = rand()
    logprobs = (old + 0.3 * rand()).requires_grad_(True)
    advantages = rand()
    eps = 0.2
    loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, old, advantages, mask, eps)
    terms, clipped_count, kls = [], 0, []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logprobs[b, t] - old[b, t])
            unclipped = -advantages[b, t] * ratio
            clipped = -advantages[b, t] * min(max(ratio, torch.tensor(1 - eps)), torch.tensor(1 + eps))
            terms.append(unclipped if unclipped >= clipped else clipped)
            clipped_count += int(clipped > unclipped)
            kls.append(0.5 * (logprobs[b, t] - old[b, t]).item() ** 2)
    naive = sum(terms) / len(terms)
    torch.testing.assert_close(loss, naive)
    assert clipfrac.item() == pytest.approx(clipped_count / len(terms)) and 0 < clipped_count < len(terms)
    assert approx_kl.item() == pytest.approx(sum(kls) / len(kls))
    torch.testing.assert_close(torch.autograd.grad(loss, logprobs)[0], torch.autograd.grad(naive, logprobs)[0])


def test_ppo_value_loss_matches_clipped_squared_error_with_gradients():
    rand, mask = batch(5)
    old, returns = rand(), rand()
    values = (old + 0.5 * rand()).requires_grad_(True)
    eps = 0.2
    loss = ppo_value_loss(values, old, returns, mask, eps)
    terms = []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                v_clip = old[b, t] + torch.clamp(values[b, t] - old[b, t], -eps, eps)
                terms.append(torch.maximum((values[b, t] - returns[b, t]) ** 2, (v_clip - returns[b, t]) ** 2))
    naive = 0.5 * sum(terms) / len(terms)
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(torch.autograd.grad(loss, values)[0], torch.autograd.grad(naive, values)[0])
