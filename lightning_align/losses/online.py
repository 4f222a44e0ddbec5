"""Online RL: PPO's policy and value losses, KL penalties and GAE; GRPO, RLOO and REINFORCE++ advantages and
the clipped policy loss they share."""

from __future__ import annotations

import torch
from torch import Tensor

# ----- PPO (Schulman et al. 2017) as used for RLHF (Ziegler et al. 2019, Ouyang et al. 2022) ----------------------
# Per-token tensors are [batch, response_length]; `mask` is 1 on response tokens and 0 on padding.


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * m) / sum(m)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, with the unbiased (Bessel-corrected) variance.

    With `shift_mean=False` the mean is added back: the scale is normalised, the sign kept (used for rewards).
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    count = mask.sum()
    variance = (((x - mean) ** 2) * mask).sum() / (count - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimator of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL divergence").

    With d = log pi - log pi_ref:  "k1": d (unbiased, can be negative per token);  "k2": d^2 / 2;
    "k3": exp(-d) - 1 + d (unbiased and never negative).
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k2, k3")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token: (advantages, returns).

    Over the unmasked positions t < t' (t' the next unmasked one): delta_t = r_t + gamma V_t' - V_t,
    A_t = delta_t + gamma lam A_t'; the value after the last unmasked position is 0, returns = A + V, and masked
    positions get 0 and are stepped over (a multi-turn episode's tokens from the environment are not the policy's
    actions: the value after a turn's last token is the value at the next turn's first).
    """
    keep = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_advantage = torch.where(keep[:, t], advantage, next_advantage)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(keep[:, t], advantage, 0.0)
    return advantages.detach(), ((advantages + values) * mask).detach()


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate: (loss, clipfrac, approx_kl), each a masked mean over tokens.

    ratio = exp(log pi - log pi_old);  loss = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)));
    clipfrac = share of tokens where the clipped term is the larger; approx_kl = mean((log pi - log pi_old)^2 / 2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2) -> Tensor:
    """Clipped value loss: 0.5 mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, -eps, eps)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2), mask)


# ----- critic-free online RL: GRPO, RLOO, REINFORCE++ ---------------------------------------------------------------
# Rewards are [batch] with a group's samples next to each other (prompt i's samples at i*G .. i*G+G-1); a NaN reward
# means every reward source abstained on that sample: it is left out of means and deviations and gets advantage 0.

SCALE_REWARDS = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("grpo", "dr_grpo", "dapo", "bnpo")
POLICY_LOSSES = ("clip", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_sum")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _nanstd(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Unbiased standard deviation over the non-NaN entries (0 where fewer than two)."""
    count = (~x.isnan()).sum(dim=dim, keepdim=True) if dim is not None else (~x.isnan()).sum()
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    squares = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) if dim is not None else torch.nansum((x - mean) ** 2)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count > 1, std, torch.zeros_like(std))
    return std if keepdim or dim is None else std.squeeze(dim)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (Shao et al. 2024, DeepSeekMath eq. 3 with outcome supervision): [batch].

    A_i = (r_i - mean_{j in group(i)} r_j) / (s + eps), s = the group's standard deviation ("group"), the whole
    batch's ("batch", as Liu et al. 2025 suggest against the group std's difficulty bias), or 1 with eps = 0
    ("none": Dr. GRPO). Standard deviations are unbiased (Bessel-corrected), as TRL computes them.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        centred = centred / (_nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1) + eps)
    elif scale_rewards == "batch":
        centred = centred / (_nanstd(rewards) + eps)
    return torch.nan_to_num(centred, nan=0.0)


def batch_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GDPO's advantages (Liu et al. 2026), for rewards summed by "normalize_then_sum": [batch].

    A_i = (R_i - mean_batch R) / (std_batch R + eps) over the whole batch's scored samples (unbiased std; a sample
    every source abstained on, NaN, gets 0). Each source was already normalised within its group
    (`combined_rewards`), so the sum is normalised once more over the batch, not the group: TRL's
    `multi_objective_aggregation="normalize_then_sum"` does the same, whatever its `scale_rewards`.
    """
    return group_advantages(rewards, rewards.shape[0], "group", eps)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024): [batch].

    A_i = r_i - 1/(n_i - 1) sum_{j in group(i), j != i} r_j, over the group's n_i scored samples (abstained ones,
    NaN, are left out and get 0); 0 when a sample has no other scored sample to compare with.
    """
    grouped = rewards.view(-1, group_size)
    scored = ~grouped.isnan()
    total = torch.nansum(grouped, dim=1, keepdim=True)
    others = (scored.sum(1, keepdim=True) - 1).clamp(min=1)
    baseline = (total - torch.nan_to_num(grouped)) / others
    advantages = torch.where(scored & (scored.sum(1, keepdim=True) > 1), grouped - baseline, 0.0)
    return advantages.view(-1)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """REINFORCE++ (Hu 2025): [batch, response] advantages from per-token rewards, no critic.

    G_t = sum_{s >= t} r_s m_s  (gamma = 1: the return to go), then A = (G - mean) / sqrt(var + 1e-8) over every
    response token of the batch (`whiten`: the global-batch normalisation that replaces a critic's baseline).
    The per-token rewards carry the KL shaping, r_t = -beta KL_t, plus the sample's score at its last token.
    """
    mask = mask.to(token_rewards.dtype)
    returns = (token_rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask
    return whiten(returns, mask) * mask


def combined_rewards(
    rewards: Tensor, weights: Tensor, aggregation: str = "sum_then_normalize", group_size: int = 1, eps: float = 1e-4
) -> Tensor:
    """One reward per sample from K reward sources: [batch, K] (NaN: the source abstained) -> [batch].

    "sum_then_normalize": R = sum_k w_k r_k over the sources that scored the sample;
    "normalize_then_sum": R = sum_k w_k (r_k - mean_g r_k) / (std_g r_k + eps), each source normalised over the
    sample's group g (GDPO, Liu et al. 2026: sources on different scales keep their own resolution; with a group
    of 1, over the batch). R is NaN where every source abstained. The advantage estimator normalises R further:
    GRPO's over the batch (`batch_advantages`) after "normalize_then_sum", over the group after "sum_then_normalize".
    """
    if aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(f"unknown reward aggregation {aggregation!r}; valid: {', '.join(REWARD_AGGREGATIONS)}")
    if aggregation == "normalize_then_sum":
        group = group_size if group_size > 1 else rewards.shape[0]
        grouped = rewards.view(-1, group, rewards.shape[1])
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        rewards = ((grouped - mean) / (_nanstd(grouped, dim=1, keepdim=True) + eps)).view_as(rewards)
    total = torch.nansum(rewards * weights.to(rewards), dim=1)
    return torch.where(rewards.isnan().all(1), torch.nan, total)


def importance_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log rho, the importance ratio's logarithm: [batch, response] ("token") or [batch, 1].

    "token":        log pi(o_t) - log pi_old(o_t), per token (PPO, GRPO);
    "sequence":     (1/|o|) sum_t (log pi(o_t) - log pi_old(o_t)), the length-normalised sequence ratio of GSPO
                    (Zheng et al. 2025, eq. 7; TRL's `importance_sampling_level="sequence"`);
    "sequence_sum": sum_t (log pi(o_t) - log pi_old(o_t)), the ratio of whole-sequence probabilities (what TRL's
                    RLOOTrainer clips).
    """
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {level!r}; valid: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    total = (log_ratio * mask).sum(-1, keepdim=True)
    return total / mask.sum(-1, keepdim=True).clamp(min=1) if level == "sequence" else total


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: str = "grpo",
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_tokens: Tensor | float | None = None,
    importance_sampling_level: str = "token",
    policy_loss: str = "clip",
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    bias_correction_kl: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of GRPO, Dr. GRPO, DAPO, GSPO, CISPO, SAPO, RLOO and REINFORCE++ with the loss aggregation
    of each.

    Per token, with rho = exp(log ratio) (`importance_log_ratio` at `importance_sampling_level`):
      "clip":  l_t = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)  (PPO's surrogate as GRPO uses it, Shao et al.
               2024; eps_high defaults to eps, DAPO's clip-higher sets it larger);
      "cispo": l_t = -sg(min(rho, eps_high)) A log pi(o_t)  (CISPO, MiniMax-M1 2025: the clipped ratio weighs a
               REINFORCE term, so no token's gradient is dropped; eps_high is the ratio's cap, e.g. 5, as TRL's);
      "sapo":  l_t = -(4 / tau) sigmoid(tau (rho - 1)) A, tau = tau_pos for A > 0 else tau_neg (SAPO, Gao et al.
               2025: a soft gate instead of the hard clip; `sapo_temperatures` = (tau_pos, tau_neg));
    plus beta k3_t with k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (DeepSeekMath eq. 4), or with
    `bias_correction_kl` beta rho k3_t (DeepSeek-V3.2, 2025: the unbiased gradient of KL(pi || pi_ref) from
    samples of pi_old; TRL's default, `use_bias_correction_kl=True`; rho differentiable, so it changes the
    gradient also on-policy). A is
    [batch] (one advantage per sample) or [batch, response]. Aggregation over the masked tokens:
      "grpo":    mean_i (sum_t l_it / |o_i|)                    (per-sequence mean; Shao et al. 2024)
      "dr_grpo": sum_it l_it / (batch * max_completion_length) (a constant normaliser; Liu et al. 2025)
      "dapo":    sum_it l_it / num_tokens                        (token-level; Yu et al. 2025), num_tokens defaults to
                 this batch's token count; pass the generation batch's, divided by its mini-batches, to weigh
                 every token of it equally across mini-batches.
      "bnpo":    sum_it l_it / (this micro-batch's token count) (TRL's "bnpo": "dapo" without `num_tokens`)
    Returns the loss and detached statistics: clipfrac (share of tokens clipped), approx_kl, and kl (mean k3,
    with a reference).
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy_loss {policy_loss!r}; valid: {', '.join(POLICY_LOSSES)}")
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, importance_sampling_level)
    ratio = torch.exp(log_ratio)
    high = epsilon if epsilon_high is None else epsilon_high
    if policy_loss == "clip":
        unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + high) * advantages
        per_token = -torch.minimum(unclipped, clipped)
        clipped_share = (clipped < unclipped).to(logprobs.dtype).expand_as(mask)
    elif policy_loss == "cispo":
        per_token = -torch.clamp(ratio, max=high).detach() * advantages * logprobs
        clipped_share = (ratio > high).to(logprobs.dtype).expand_as(mask)
    else:
        positive, negative = ratio.new_tensor(sapo_temperatures[0]), ratio.new_tensor(sapo_temperatures[1])
        tau = torch.where(advantages > 0, positive, negative)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
        clipped_share = torch.zeros_like(mask)
    stats = {
        "clipfrac": masked_mean(clipped_share, mask).detach(),
        "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs).detach() ** 2, mask),
    }
    per_token = per_token.expand_as(mask)
    if ref_logprobs is not None and beta != 0:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * (kl * ratio if bias_correction_kl else kl)
        stats["kl"] = masked_mean(kl.detach(), mask)
    summed = per_token * mask
    if aggregation == "grpo":
        loss = (summed.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif aggregation == "dr_grpo":
        loss = summed.sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    elif aggregation == "bnpo":
        loss = summed.sum() / mask.sum().clamp(min=1)
    else:
        loss = summed.sum() / (mask.sum() if num_tokens is None else torch.as_tensor(num_tokens)).clamp(min=1)
    return loss, stats
