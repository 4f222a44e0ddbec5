"""Losses on preference pairs: the reward model's pairwise loss, the DPO family, ORPO's odds ratio, SimPO, and
WPO's and LD-DPO's reweighting of log-probs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_align.losses.kto import _log1mexp


def pairwise_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> Tensor:
    """Bradley-Terry loss, mean of -log sigmoid(r+ - r- - m)  (Ouyang et al. 2022, eq. 1; margin as in Llama 2),
    plus c mean((r+ + r-)^2) with c = `center_rewards_coefficient` (Eisenstein et al. 2023, "Helping or Herding?":
    rewards centred on zero, which the pairwise loss alone leaves free; TRL's name).

    chosen_rewards, rejected_rewards: [batch] scalar rewards; margin: optional [batch] required gap.
    """
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        gap = gap - margin
    loss = -F.logsigmoid(gap).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


DPO_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses written on the score difference h, where f-DPO's scores can replace the log-ratios.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "hinge", "robust", "exo_pair", "discopop")
# Where label smoothing has a meaning (for "exo_pair" it is required: the target distribution's epsilon).
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "simpo", "exo_pair", "aot", "aot_unpaired")
# Losses defined on length-averaged log-probabilities (policy and reference).
LENGTH_AVERAGED_LOSS_TYPES = ("sigmoid_norm", "simpo", "orpo")


def check_label_smoothing(loss_type: str, label_smoothing: float) -> None:
    """Refuse label smoothing for a loss that defines none, rather than ignore it."""
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing is not defined for loss_type={loss_type!r}; it applies to "
            f"{', '.join(SMOOTHED_LOSS_TYPES)}"
        )
    if loss_type == "exo_pair" and not 0 < label_smoothing < 1:
        raise ValueError(
            "loss_type='exo_pair' needs 0 < label_smoothing < 1 (the target distribution's epsilon; EXO's paper "
            f"uses 1e-3), got {label_smoothing}"
        )


def f_divergence_scores(log_ratio: Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """f-DPO's score f'(u) of a response, u = pi(y|x) / pi_ref(y|x) (Wang et al. 2023, "Beyond Reverse KL", Table 1;
    `log_ratio` = log u, [batch]). Constants that cancel in the chosen-minus-rejected difference are TRL's:
      "reverse_kl":       log u (DPO itself);
      "forward_kl":       1 - 1/u;
      "js_divergence":    log(2u / (1 + u)) = log 2 + log sigmoid(log u);
      "alpha_divergence": (u^(alpha - 1) - 1) / (alpha - 1), alpha = TRL's `f_alpha_divergence_coef` (the paper's
                          alpha is 1 - this one); alpha = 1 is reverse KL. The exponent is capped at 80, and
                          computed in float32 at least.
    """
    if kind not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {kind!r}; valid: {', '.join(F_DIVERGENCES)}")
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        exponent = ((alpha - 1.0) * log_ratio).to(torch.promote_types(log_ratio.dtype, torch.float32))
        exponent = torch.clamp(exponent, max=80.0)
        return (torch.exp(exponent) - 1.0).to(log_ratio.dtype) / (alpha - 1.0)
    return log_ratio


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    bco_delta: Tensor | float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference losses on the log-ratios, per example: (losses, chosen_rewards, rejected_rewards).

    With a+ = log pi(y+|x) - log pi_ref(y+|x), a- likewise for y-, h = a+ - a- (all inputs [batch]) and
    eps = label_smoothing:
      "sigmoid":   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                   (DPO, Rafailov et al. 2023; eps > 0 is conservative DPO, cDPO)
      "ipo":       (h - 1 / (2 beta))^2                              (IPO, Azar et al. 2023, eq. 17; its authors, and
                   TRL, use length-averaged log-probs here: `DPOModule(ipo_normalize=True)`)
      "hinge":     relu(1 - beta h)                                  (SLiC, Zhao et al. 2023)
      "robust":    (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
                   (rDPO, Chowdhury et al. 2024: unbiased when a share eps of the labels is flipped; eps < 1/2)
      "exo_pair":  q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps), q = sigmoid(beta h)
                   (EXO, Ji et al. 2024, eq. 16 with K = 2: KL(p_model || p_target) over {y+, y-}; eps > 0 needed)
      "nca_pair":  -log sigmoid(beta a+) - 1/2 log sigmoid(-beta a+) - 1/2 log sigmoid(-beta a-)
                   (NCA, Chen et al. 2024, pairwise form)
      "bco_pair":  -log sigmoid(beta a+ - delta) - log sigmoid(-(beta a- - delta))
                   (BCO, Jung et al. 2024: delta is a running mean of the implicit rewards, `bco_delta`; TRL's
                   bco_pair uses delta = 0, which `bco_delta=0` gives)
      "sppo_hard": (a+ - 1 / (2 beta))^2 + (a- + 1 / (2 beta))^2     (SPPO, Wu et al. 2024, eq. 4.7 with hard
                   win probabilities 1 and 0)
      "aot":       -(1 - eps) log sigmoid(beta d_i) - eps log sigmoid(-beta d_i), d = sort(l) - sort(l_ref) over the
                   batch, l = log pi(y+) - log pi(y-), l_ref likewise (AOT, Melnyk et al. 2024, paired: the
                   policy's margins dominate the reference's in distribution)
      "aot_unpaired": the same with d = sort(a+) - sort(a-) (AOT for unpaired data)
      "apo_zero":  (1 - sigmoid(beta a+)) + sigmoid(beta a-)         (APO-zero, D'Oosterlinck et al. 2024, eq. 7:
                   chosen answers better than the model's own)
      "apo_down":  sigmoid(beta a+) + (1 - sigmoid(beta h))          (APO-down, eq. 8: chosen answers worse)
      "discopop":  (1 - m) (-log sigmoid(beta h)) + m exp(-beta h), m = sigmoid(beta h / tau)
                   (DiscoPOP's log-ratio modulated loss, Chris Lu et al. 2024, eq. 5; tau = `discopop_tau`)
      "sigmoid_norm": -log sigmoid(beta h) on length-averaged log-probs (the module passes averages)
    With `f_divergence_type` other than "reverse_kl" (f-DPO, Wang et al. 2023), h = f'(u+) - f'(u-) instead
    (`f_divergence_scores`), for the losses written on h (`F_DIVERGENCE_LOSS_TYPES`); refused for the others.
    Rewards are the implicit rewards beta a+ and beta a-, detached. Label smoothing is refused where it has no
    meaning (`SMOOTHED_LOSS_TYPES`).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES + ('simpo', 'sft'))}")
    check_label_smoothing(loss_type, label_smoothing)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if f_divergence_type != "reverse_kl":
        if loss_type not in F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} applies to {', '.join(F_DIVERGENCE_LOSS_TYPES)}, not "
                f"loss_type={loss_type!r}"
            )
        h = f_divergence_scores(chosen_ratio, f_divergence_type, f_alpha_divergence_coef) - f_divergence_scores(
            rejected_ratio, f_divergence_type, f_alpha_divergence_coef
        )
    eps = label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        q_log, not_q_log = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
        losses = q_log.exp() * (q_log - math.log1p(-eps)) + not_q_log.exp() * (not_q_log - math.log(eps))
    elif loss_type == "nca_pair":
        chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
        losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_ratio - bco_delta) - F.logsigmoid(-(beta * rejected_ratio - bco_delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 1 / (2 * beta)) ** 2 + (rejected_ratio + 1 / (2 * beta)) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            margins = policy_chosen_logps - policy_rejected_logps
            delta = margins.sort().values - (ref_chosen_logps - ref_rejected_logps).sort().values
        else:
            delta = chosen_ratio.sort().values - rejected_ratio.sort().values
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_ratio) + (1 - torch.sigmoid(beta * h))
    else:  # discopop
        modulation = torch.sigmoid(beta * h / discopop_tau)
        losses = (1 - modulation) * -F.logsigmoid(beta * h) + modulation * torch.exp(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4-7), reference-free, per example: (losses, log_odds_ratio).

    With length-averaged log-probabilities l = (1/|y|) log P(y|x) (the inputs, [batch]), log odds(y|x) =
    l - log(1 - exp(l)), and losses = -log sigmoid(log odds(y+|x) - log odds(y-|x)). ORPO's objective adds
    lambda times this to the chosen responses' NLL (`DPOModule(loss_type=["orpo", "sft"])`, `ORPOModule`).
    """
    log_odds = (policy_chosen_logps - _log1mexp(policy_chosen_logps)) - (
        policy_rejected_logps - _log1mexp(policy_rejected_logps)
    )
    return -F.logsigmoid(log_odds), log_odds.detach()


def wpo_weights(token_logps: Tensor, token_log_sum_sq: Tensor, rows: Tensor, num_pairs: int) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, "WPO", eq. 2 with sampled alignment): [pairs], detached.

    Per response y: w(y) = exp((1/|y|) sum_t (log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2)): how likely the
    policy itself is to produce y, normalised by how peaked its next-token distributions are; a pair weighs
    w(y+) w(y-), so pairs far from the policy's own outputs count less. `token_logps`, `token_log_sum_sq` and
    `rows` [K] per scored token (rows 0..P-1 chosen, P..2P-1 rejected).
    """
    rows = rows.to(token_logps.device)
    totals = torch.zeros(2 * num_pairs, dtype=token_logps.dtype, device=token_logps.device)
    totals = totals.index_add(0, rows, (token_logps - token_log_sum_sq).detach())
    counts = torch.bincount(rows, minlength=2 * num_pairs).clamp(min=1)
    chosen, rejected = torch.exp(totals / counts).chunk(2)
    return chosen * rejected


def length_desensitised_logps(token_logps: Tensor, rows: Tensor, num_pairs: int, alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO's sequence log-probs (Liu et al. 2024, "LD-DPO", eq. 9): (chosen [pairs], rejected [pairs]).

    For a pair whose responses have l+ and l- scored tokens, each response's first min(l+, l-) tokens count in
    full and the rest ("verbose" tokens) with weight alpha: log p = sum_{t <= l_min} log p_t + alpha
    sum_{t > l_min} log p_t. alpha = 1 is plain DPO; the paper uses 0 < alpha < 1. `token_logps` [K] and `rows`
    [K] (the batch row of each scored token; rows 0..P-1 chosen, P..2P-1 rejected, each row's tokens in order).
    """
    order = torch.sort(rows, stable=True).indices
    token_logps, rows = token_logps[order], rows[order]
    lengths = torch.bincount(rows, minlength=2 * num_pairs)
    starts = lengths.cumsum(0) - lengths
    position = torch.arange(len(rows), device=rows.device) - starts[rows]
    shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)
    weights = torch.where(position < shared[rows], 1.0, alpha).to(token_logps.dtype)
    sums = torch.zeros(2 * num_pairs, dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps * weights).chunk(2)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, reference-free (Meng et al. 2024, eq. 6), per example: (losses, chosen_rewards, rejected_rewards).

    z = beta avg_logp(y+|x) - beta avg_logp(y-|x) - gamma, where the inputs are length-averaged log-probabilities
    (`sequence_logps(..., average=True)`) and gamma is the target reward margin;
    losses = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), eps = label_smoothing (0 in the paper; the
    smoothed form is the one TRL's CPO trainer uses for SimPO). Rewards are beta * avg_logp of each response,
    detached.
    """
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    z = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
