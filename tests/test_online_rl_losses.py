"""GRPO, RLOO and REINFORCE++ estimators and the clipped policy loss against naive float64 loops, gradients
included."""

import math

import pytest
import torch

from lightning_align.losses import (
    clipped_policy_loss,
    combined_rewards,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

NAN = float("nan")


def std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def rewards_with_abstentions():
    # 3 prompts x 4 samples; the second group has an abstained sample, the third is all equal.
    return torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, NAN, -1.0, 0.0, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_centre_on_the_group_and_scale_as_asked(scale):
    rewards, G, eps = rewards_with_abstentions(), 4, 1e-4
    out = group_advantages(rewards, G, scale)
    scored_all = [r for r in rewards.tolist() if not math.isnan(r)]
    for i, r in enumerate(rewards.tolist()):
        if math.isnan(r):
            assert out[i] == 0
            continue
        group = [x for x in rewards.tolist()[i // G * G : i // G * G + G] if not math.isnan(x)]
        centred = r - sum(group) / len(group)
        scale_by = {"group": std(group) + eps, "batch": std(scored_all) + eps, "none": 1.0}[scale]
        assert out[i].item() == pytest.approx(centred / scale_by)


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    rewards, G = rewards_with_abstentions(), 4
    out = rloo_advantages(rewards, G)
    values = rewards.tolist()
    for i, r in enumerate(values):
        start = i // G * G
        others = [values[j] for j in range(start, start + G) if j != i and not math.isnan(values[j])]
        expected = 0.0 if math.isnan(r) or not others else r - sum(others) / len(others)
        assert out[i].item() == pytest.approx(expected)


def test_reinforce_pp_returns_to_go_then_global_whitening():
    g = torch.Generator().manual_seed(0)
    token_rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    out = reinforce_pp_advantages(token_rewards, mask)
    returns = {}
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                returns[b, t] = sum(token_rewards[b, s].item() for s in range(t, 5) if mask[b, s])
    values = list(returns.values())
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    for (b, t), value in returns.items():
        assert out[b, t].item() == pytest.approx((value - mean) / math.sqrt(variance + 1e-8))
    assert (out[mask == 0] == 0).all()


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_combined_rewards_weigh_sources_and_skip_abstentions(aggregation):
    # 2 groups of 3 samples, 2 sources; sample 1 has one abstention, sample 4 two.
    rewards = torch.tensor(
        [[1.0, 0.0], [NAN, 2.0], [0.5, 1.0], [0.0, 3.0], [NAN, NAN], [1.0, 1.0]], dtype=torch.float64
    )
    weights, G, eps = torch.tensor([2.0, 0.5], dtype=torch.float64), 3, 1e-4
    out = combined_rewards(rewards, weights, aggregation, G)
    rows = rewards.tolist()
    for i, row in enumerate(rows):
        if all(math.isnan(v) for v in row):
            assert math.isnan(out[i].item())
            continue
        total = 0.0
        for k, v in enumerate(row):
            if math.isnan(v):
                continue
            if aggregation == "normalize_then_sum":
                group = [rows[j][k] for j in range(i // G * G, i // G * G + G) if not math.isnan(rows[j][k])]
                v = (v - sum(group) / len(group)) / (std(group) + eps)
            total += weights[k].item() * v
        assert out[i].item() == pytest.approx(total)


def naive_clipped_loss(
    logprobs,
    old,
    adv,
    mask,
    eps,
    eps_high,
    aggregation,
    ref,
    beta,
    max_len,
    num_tokens,
    level="token",
    policy_loss="clip",
    temperatures=(1.0, 1.05),
    bias_correction=False,
):
    B, T = mask.shape
    per_seq, total, count = [], 0.0, 0.0
    for b in range(B):
        seq_total, seq_count = 0.0, 0.0
        steps = [t for t in range(T) if mask[b, t]]
        log_ratio_sum = sum((logprobs[b, t] - old[b, t] for t in steps), torch.zeros((), dtype=logprobs.dtype))
        for t in steps:
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            if level == "token":
                ratio = torch.exp(logprobs[b, t] - old[b, t])
            elif level == "sequence":  # GSPO: the length-normalised sequence ratio
                ratio = torch.exp(log_ratio_sum / len(steps))
            else:
                ratio = torch.exp(log_ratio_sum)
            if policy_loss == "clip":
                loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps_high) * a)
            elif policy_loss == "cispo":
                loss = -min(ratio.item(), eps_high) * a * logprobs[b, t]
            else:
                tau = temperatures[0] if a > 0 else temperatures[1]
                loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
            if ref is not None:
                k3 = torch.exp(ref[b, t] - logprobs[b, t]) - (ref[b, t] - logprobs[b, t]) - 1
                loss = loss + beta * (k3 * ratio if bias_correction else k3)
            seq_total, seq_count = seq_total + loss, seq_count + 1
        per_seq.append(seq_total / max(seq_count, 1))
        total, count = total + seq_total, count + seq_count
    if aggregation == "grpo":
        return sum(per_seq) / B
    if aggregation == "dr_grpo":
        return total / (B * max_len)
    if aggregation == "bnpo":
        return total / count
    return total / (num_tokens if num_tokens is not None else count)


def policy_loss_inputs(token_level: bool, with_ref: bool):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 6
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    logprobs = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logprobs.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # ratios beyond the clip
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if token_level else torch.randn(B, generator=g)
    ref = logprobs.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2 if with_ref else None
    return logprobs, old, adv.double(), mask, ref


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize("with_ref", [False, True])
def test_clipped_policy_loss_and_its_gradient_match_a_naive_loop(aggregation, token_level, with_ref):
    logprobs, old, adv, mask, ref = policy_loss_inputs(token_level, with_ref)
    options = dict(epsilon=0.2, epsilon_high=0.28, aggregation=aggregation, max_completion_length=8)
    num_tokens = 30.0 if aggregation == "dapo" else None
    loss, stats = clipped_policy_loss(
        logprobs, old, adv, mask, ref_logprobs=ref, beta=0.04, num_tokens=num_tokens, **options
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    naive_input = logprobs.detach().clone().requires_grad_()
    expected = naive_clipped_loss(naive_input, old, adv, mask, 0.2, 0.28, aggregation, ref, 0.04, 8, num_tokens)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, naive_input.grad, rtol=1e-10, atol=1e-12)
    ratios = torch.exp(logprobs.detach() - old)[mask.bool()]
    assert 0 < stats["clipfrac"] < 1 and ((ratios < 0.8) | (ratios > 1.28)).any()
    assert ("kl" in stats) == with_ref


@pytest.mark.parametrize(
    "level, policy_loss, bias_correction",
    [
        ("sequence", "clip", False),
        ("sequence_sum", "clip", False),
        ("token", "cispo", False),
        ("sequence", "cispo", False),
        ("token", "sapo", False),
        ("token", "clip", True),
        ("sequence", "sapo", True),
    ],
)
def test_gspo_cispo_sapo_and_the_corrected_kl_match_a_naive_loop(level, policy_loss, bias_correction):
    logprobs, old, adv, mask, ref = policy_loss_inputs(False, True)
    eps_high = 1.1 if policy_loss == "cispo" else 0.28  # CISPO's eps_high caps the ratio itself
    loss, _ = clipped_policy_loss(
        logprobs,
        old,
        adv,
        mask,
        0.2,
        eps_high,
        "grpo",
        ref,
        0.04,
        importance_sampling_level=level,
        policy_loss=policy_loss,
        sapo_temperatures=(1.2, 2.0),
        bias_correction_kl=bias_correction,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    naive_input = logprobs.detach().clone().requires_grad_()
    expected = naive_clipped_loss(
        naive_input,
        old,
        adv,
        mask,
        0.2,
        eps_high,
        "grpo",
        ref,
        0.04,
        8,
        None,
        level,
        policy_loss,
        (1.2, 2.0),
        bias_correction,
    )
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, naive_input.grad, rtol=1e-10, atol=1e-12)


def test_clip_higher_lets_positive_advantages_move_further():
    logprobs = torch.log(torch.tensor([[1.25]], dtype=torch.float64)).requires_grad_()
    old, mask, adv = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1), torch.ones(1, dtype=torch.float64)
    symmetric, _ = clipped_policy_loss(logprobs, old, adv, mask, epsilon=0.2)
    higher, _ = clipped_policy_loss(logprobs, old, adv, mask, epsilon=0.2, epsilon_high=0.28)
    assert torch.autograd.grad(symmetric, logprobs)[0].item() == 0  # ratio 1.25 is clipped at 1.2
    assert torch.autograd.grad(higher, logprobs)[0].item() == pytest.approx(-1.25)  # but not at 1.28


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: group_advantages(r, 2, "groups"), "unknown scale_rewards"),
        (lambda r: combined_rewards(r[:, None], torch.ones(1), "mean"), "unknown reward aggregation"),
        (
            lambda r: clipped_policy_loss(r[:, None], r[:, None], r, torch.ones(4, 1), aggregation="tokens"),
            "unknown loss aggregation",
        ),
        (
            lambda r: clipped_policy_loss(r[:, None], r[:, None], r, torch.ones(4, 1), policy_loss="ppo"),
            "unknown policy_loss",
        ),
        (
            lambda r: clipped_policy_loss(r[:, None], r[:, None], r, torch.ones(4, 1), importance_sampling_level="x"),
            "unknown importance_sampling_level",
        ),
    ],
)
def test_unknown_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(4))
