"""The preference objective of `DPOModule`: its settings, checked, and the weighted mixture of loss types computed
from each row's summed log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_align.losses import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    LENGTH_AVERAGED_LOSS_TYPES,
    SMOOTHED_LOSS_TYPES,
    check_label_smoothing,
    dpo_loss,
    orpo_loss,
    simpo_loss,
)

REFERENCE_FREE_TYPES = ("simpo", "sft", "orpo")
NLL_AVERAGES = ("tokens", "responses")
DEFAULTS = {
    "ipo_normalize": True,
    "simpo_gamma": 0.5,
    "discopop_tau": 0.05,
    "f_alpha_divergence_coef": 0.5,
    "bco_running_mean": True,
}
USED_BY = {
    "ipo_normalize": ("ipo",),
    "simpo_gamma": ("simpo",),
    "discopop_tau": ("discopop",),
    "f_alpha_divergence_coef": None,  # alpha_divergence's: checked below
    "bco_running_mean": ("bco_pair",),
}


@dataclass
class PreferenceObjective:
    """One loss type or a weighted mixture of them (`DPOModule`'s arguments of the same names)."""

    beta: float = 0.1
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    ipo_normalize: bool = True
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    nll_average: str = "tokens"
    bco_running_mean: bool = True

    def __post_init__(self):
        self.loss_types = tuple(self.loss_types)
        self.loss_weights = tuple(self.loss_weights) if self.loss_weights is not None else (1.0,) * len(self.loss_types)
        self.check()

    @property
    def reference_free(self) -> bool:
        return all(kind in REFERENCE_FREE_TYPES for kind in self.loss_types)

    def check(self) -> None:
        """Refuse unknown loss types, mismatched weights, and settings that none of the chosen losses uses."""
        kinds = list(self.loss_types)
        valid = DPO_LOSS_TYPES + ("simpo", "orpo", "sft")
        unknown = [kind for kind in kinds if kind not in valid]
        if unknown or not kinds:
            raise ValueError(f"unknown loss_type {unknown[0] if unknown else kinds!r}; valid: {', '.join(valid)}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"loss_type lists a type twice: {kinds}; weigh it with loss_weights instead")
        if kinds == ["sft"]:
            raise ValueError('loss_type "sft" alone is supervised fine-tuning: use SFTModule, or add a preference loss')
        if len(self.loss_weights) != len(kinds):
            raise ValueError(f"{len(self.loss_weights)} loss_weights for {len(kinds)} loss types; give one per type")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}: it scales the implicit reward (DPO uses ~0.1)")
        if self.label_smoothing and not any(kind in SMOOTHED_LOSS_TYPES for kind in kinds):
            raise ValueError(
                f"label_smoothing is not defined for loss_type={' + '.join(map(repr, kinds))}; it applies to "
                f"{', '.join(SMOOTHED_LOSS_TYPES)}"
            )
        for kind in kinds:
            if kind in SMOOTHED_LOSS_TYPES or kind == "exo_pair":
                check_label_smoothing(kind, self.label_smoothing)
        for name, users in USED_BY.items():
            if users and getattr(self, name) != DEFAULTS[name] and not set(users) & set(kinds):
                raise ValueError(f"{name} is a setting of loss_type {users[0]!r}, which is not among {kinds}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence_type {self.f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl":
            others = [kind for kind in kinds if kind not in F_DIVERGENCE_LOSS_TYPES + ("sft",)]
            if others:
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} applies to {', '.join(F_DIVERGENCE_LOSS_TYPES)} "
                    f"(and 'sft'), not {others}"
                )
        if self.f_alpha_divergence_coef != DEFAULTS["f_alpha_divergence_coef"] and (
            self.f_divergence_type != "alpha_divergence"
        ):
            raise ValueError("f_alpha_divergence_coef is a setting of f_divergence_type='alpha_divergence'")
        if self.nll_average not in NLL_AVERAGES:
            raise ValueError(f"unknown nll_average {self.nll_average!r}; valid: {', '.join(NLL_AVERAGES)}")

    def averaged(self, kind: str) -> bool:
        return kind in LENGTH_AVERAGED_LOSS_TYPES or (kind == "ipo" and self.ipo_normalize)

    def chosen_nll(self, sums: torch.Tensor, lengths: torch.Tensor, tokens=None) -> torch.Tensor:
        """The chosen responses' negative log-likelihood, one value per pair: the token mean over all the batch's
        chosen tokens ("tokens", as SFT and TRL; `tokens` overrides their count, e.g. the global batch's per
        process), or each response's own token mean ("responses", as RPO)."""
        chosen, chosen_lengths = sums.chunk(2)[0], lengths.chunk(2)[0]
        if self.nll_average == "responses":
            return -chosen / chosen_lengths
        return (-chosen.sum() / (chosen_lengths.sum() if tokens is None else tokens)).expand_as(chosen)

    def __call__(
        self,
        sums: torch.Tensor,
        lengths: torch.Tensor,
        ref_sums: torch.Tensor | None,
        bco_delta: float = 0.0,
        nll_tokens=None,
    ) -> dict[str, torch.Tensor]:
        """Per-pair losses and metrics from the rows' summed log-probs [2 * pairs] (chosen rows first), their
        scored-token counts, and the reference's sums (None when reference-free); `nll_tokens` as `chosen_nll`'s.

        Logged rewards and log-probs are the first preference type's, with TRL's meaning: for the DPO family beta
        times the summed log-ratio and the summed log-probs (also where the loss averages them, as "ipo" and
        "sigmoid_norm"); for "simpo" and "orpo" their length-averaged ones."""
        means = sums / lengths
        losses, shown, extra = 0.0, None, {}
        for kind, weight in zip(self.loss_types, self.loss_weights):
            chosen, rejected = (means if self.averaged(kind) else sums).chunk(2)
            if kind == "sft":
                losses = losses + weight * self.chosen_nll(sums, lengths, nll_tokens)
                continue
            if kind == "simpo":
                result = simpo_loss(chosen, rejected, self.beta, self.simpo_gamma, self.label_smoothing)
                metrics = (chosen.detach(), rejected.detach(), result[1], result[2])
            elif kind == "orpo":
                odds_losses, log_odds = orpo_loss(chosen, rejected)
                result = (odds_losses,)
                metrics = (
                    chosen.detach(),
                    rejected.detach(),
                    self.beta * chosen.detach(),
                    self.beta * rejected.detach(),
                )
                # TRL's names: the mean log sigmoid of the log odds ratio, and the log odds ratio itself.
                extra["log_odds_ratio"] = F.logsigmoid(log_odds)
                extra["log_odds_chosen"] = log_odds
            else:
                ref_chosen, ref_rejected = (ref_sums / lengths if self.averaged(kind) else ref_sums).chunk(2)
                result = dpo_loss(
                    chosen,
                    rejected,
                    ref_chosen,
                    ref_rejected,
                    self.beta,
                    kind,
                    self.label_smoothing if kind in SMOOTHED_LOSS_TYPES else 0.0,
                    bco_delta=bco_delta if self.bco_running_mean else 0.0,
                    discopop_tau=self.discopop_tau,
                    f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                )
                policy, reference = sums.detach().chunk(2), ref_sums.detach().chunk(2)
                rewards = [self.beta * (p - r) for p, r in zip(policy, reference)]
                metrics = (*policy, *rewards)
            losses = losses + weight * result[0]
            shown = metrics if shown is None else shown
        chosen, rejected, chosen_rewards, rejected_rewards = shown
        return {
            "loss": losses,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen,
            "logps/rejected": rejected,
            **extra,
        }
