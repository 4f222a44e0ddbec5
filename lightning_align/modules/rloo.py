"""RLOO as TRL's RLOOTrainer defines it, for users coming from there: `GRPOModule` with the leave-one-out
baseline, a sequence-level ratio and the KL in the reward."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_align.modules.base import ModelSource
from lightning_align.modules.grpo import GRPOModule
from lightning_align.modules.rewards import RewardSource

# GRPOModule's settings that make it TRL's RLOO; refused if given otherwise.
FIXED = {"advantage": "rloo", "importance_sampling_level": "sequence_sum", "kl_in_reward": True}


class RLOOModule(GRPOModule):
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics") in TRL's form.

    Each sample's reward, less beta times its summed k1 KL to the reference (log pi_old - log pi_ref over its
    tokens), is compared with the mean of its group's other samples (`losses.rloo_advantages`); optionally the
    advantages are normalised over the batch (`normalize_advantages`). The loss is the clipped surrogate on the
    whole sequence's probability ratio, -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) with
    rho = pi(o) / pi_old(o), averaged over samples. Defaults are TRL's RLOOConfig's: beta 0.05, 2 generations.

    `GRPOModule(advantage="rloo")` is the token-level form (each token's ratio clipped, beta * k3 in the loss).
    Other arguments as `GRPOModule`.
    """

    def __init__(
        self,
        policy: ModelSource,
        rewards: RewardSource | Sequence[RewardSource] | None = None,
        num_generations: int = 2,
        beta: float = 0.05,
        normalize_advantages: bool = False,
        **kwargs,
    ):
        given = [name for name, value in FIXED.items() if kwargs.pop(name, value) != value]
        if given:
            raise ValueError(f"RLOOModule sets {', '.join(given)} itself; use GRPOModule for other forms")
        super().__init__(
            policy,
            rewards,
            num_generations=num_generations,
            beta=beta,
            normalize_advantages=normalize_advantages,
            **FIXED,
            **kwargs,
        )
