"""ORPO: preference tuning in one stage, without a reference model (Hong et al. 2024)."""

from __future__ import annotations

from lightning_align.modules.base import ModelSource
from lightning_align.modules.dpo import DPOModule

# DPOModule's settings that ORPO fixes, with DPOModule's defaults (which LightningCLI passes along).
FIXED = {
    "loss_type": "sigmoid",
    "loss_weights": None,
    "beta": 0.1,
    "ref_model": None,
    "precompute_ref_logps": False,
    "ref_cache_dir": None,
}


class ORPOModule(DPOModule):
    """Odds Ratio Preference Optimization on `PreferenceDataModule` batches: the chosen responses' negative
    log-likelihood (`nll_average`: by default the token mean over the batch's chosen tokens) plus `orpo_lambda`
    times the odds-ratio loss
    -log sigmoid(log odds(y+) - log odds(y-)) on length-averaged log-probabilities (`losses.orpo_loss`). It
    starts from a base model: supervised fine-tuning and preference alignment at once, no reference pass.

    Args:
        orpo_lambda: weight of the odds-ratio term (the paper's lambda: 0.1 for its Mistral and Llama runs); the
            logged rewards are orpo_lambda times each response's mean token log-prob, as TRL logs them.
        Other arguments as `DPOModule` (`padding_free`, `scoring_check`, `ld_alpha`, `rpo_alpha`, ...) and
        `AlignModule`; the loss and reference settings are ORPO's own and refused.

    Logs, besides `DPOModule`'s metrics, TRL's `log_odds_ratio` (mean log sigmoid of the log odds ratio) and
    `log_odds_chosen` (mean log odds ratio of chosen over rejected), in training and validation.
    """

    def __init__(self, model: ModelSource, orpo_lambda: float = 0.1, **kwargs):
        given = [name for name, default in FIXED.items() if kwargs.pop(name, default) != default]
        if given:
            raise ValueError(f"ORPOModule sets {', '.join(given)} itself (ORPO is NLL + lambda * odds ratio)")
        if orpo_lambda <= 0:
            raise ValueError(f"orpo_lambda must be positive, got {orpo_lambda}")
        super().__init__(model, beta=orpo_lambda, loss_type=["sft", "orpo"], loss_weights=[1.0, orpo_lambda], **kwargs)
        self.orpo_lambda = orpo_lambda
