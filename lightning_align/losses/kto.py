"""KTO's loss on unpaired answers and its KL point."""

from __future__ import annotations

import math

import torch
from torch import Tensor

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8), per example: (losses, rewards).

    r = log pi(y|x) - log pi_ref(y|x) (inputs [batch]; `desirable` [batch] bool), z0 = `kl` the reference point
    (`kto_kl`, detached), and losses = lambda_D (1 - sigmoid(beta (r - z0))) for desirable answers,
    lambda_U (1 - sigmoid(beta (z0 - r))) for undesirable ones. Rewards are beta r, detached.
    loss_type="apo_zero_unpaired": APO-zero for unpaired answers (D'Oosterlinck et al. 2024, eq. 7 one answer at a
    time): the same with z0 = 0 (`kl` is ignored; no mismatched rows are needed).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(KTO_LOSS_TYPES)}")
    ratio = policy_logps - ref_logps
    kl = torch.zeros_like(ratio) if loss_type == "apo_zero_unpaired" else kl
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - kl)), torch.sigmoid(beta * (kl - ratio)))
    weights = torch.where(desirable, value.new_tensor(desirable_weight), value.new_tensor(undesirable_weight))
    return weights * (1 - value), beta * ratio.detach()


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean_j (log pi(y_j'|x_j) - log pi_ref(y_j'|x_j))), estimated on mismatched
    prompt / answer pairs of the batch (the paper's biased but practical estimate; no gradient flows through it)."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
