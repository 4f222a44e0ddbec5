"""ORPO: preference tuning in one stage, without a reference model (Hong et al. 2024)."""

from __future__ import annotations

import torch

from lightning_align.modules.base import ModelSource
from lightning_align.modules.dpo import DPOModule
from lightning_align.scoring.rows import plan_token_logps

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
    log-likelihood (each response's token mean, averaged over pairs, as ORPO's paper, eq. 2; `nll_on_prompt=True`
    for TRL's) plus `orpo_lambda` times the odds-ratio loss
    -log sigmoid(log odds(y+) - log odds(y-)) on length-averaged log-probabilities (`losses.orpo_loss`). It
    starts from a base model: supervised fine-tuning and preference alignment at once, no reference pass.

    Args:
        nll_average: "responses" (default, the paper's) or "tokens" (the token mean over the chosen completions).
        orpo_lambda: weight of the odds-ratio term (the paper's lambda: 0.1 for its Mistral and Llama runs); the
            logged rewards are orpo_lambda times each response's mean token log-prob, as TRL logs them.
        nll_on_prompt: the NLL term also counts the chosen rows' prompt tokens: the token mean over every token of
            the chosen rows after the first, as TRL's ORPOTrainer computes it (one forward pass, as without it).
            False (default): the chosen completions' tokens only, as ORPO's paper (eq. 2) and SFT.
        Other arguments as `DPOModule` (`padding_free`, `scoring_check`, `ld_alpha`, `rpo_alpha`, ...) and
        `AlignModule`; the loss and reference settings are ORPO's own and refused.

    Logs, besides `DPOModule`'s metrics, TRL's `log_odds_ratio` (mean log sigmoid of the log odds ratio) and
    `log_odds_chosen` (mean log odds ratio of chosen over rejected), in training and validation.
    """

    def __init__(
        self,
        model: ModelSource,
        orpo_lambda: float = 0.1,
        nll_on_prompt: bool = False,
        nll_average: str = "responses",
        **kwargs,
    ):
        given = [name for name, default in FIXED.items() if kwargs.pop(name, default) != default]
        if given:
            raise ValueError(f"ORPOModule sets {', '.join(given)} itself (ORPO is NLL + lambda * odds ratio)")
        if orpo_lambda <= 0:
            raise ValueError(f"orpo_lambda must be positive, got {orpo_lambda}")
        weights = [1.0, orpo_lambda]
        kwargs["nll_average"] = nll_average
        super().__init__(model, beta=orpo_lambda, loss_type=["sft", "orpo"], loss_weights=weights, **kwargs)
        self.orpo_lambda, self.nll_on_prompt = orpo_lambda, nll_on_prompt
        if nll_on_prompt and (self.ld_alpha is not None or self.use_weighting or self.rpo_alpha):
            raise ValueError("nll_on_prompt=True (TRL's ORPO NLL) does not combine with ld_alpha, WPO or rpo_alpha")

    def preference_step(self, batch: dict) -> dict[str, torch.Tensor]:
        if not self.nll_on_prompt:
            return super().preference_step(batch)
        # One forward scoring every token of the chosen rows (for the NLL) and the completions of all rows.
        pairs = len(batch["labels"]) // 2
        labels = batch["labels"].clone()
        labels[:pairs] = batch["input_ids"][:pairs].masked_fill(batch["attention_mask"][:pairs] == 0, -100)
        scored = {**batch, "labels": labels}
        logps, rows = plan_token_logps(self.model, scored, self.scoring_plan(self.model, scored))
        order = torch.sort(rows, stable=True).indices
        logps, rows = logps[order], rows[order]
        counted = (labels[:, 1:] != -100).sum(-1)
        completion = (batch["labels"][:, 1:] != -100).sum(-1)
        position = torch.arange(len(rows), device=rows.device) - (counted.cumsum(0) - counted)[rows]
        in_completion = position >= (counted - completion)[rows]  # a row's completion ends its scored tokens
        sums = torch.zeros(len(labels), dtype=logps.dtype, device=logps.device)
        sums = sums.index_add(0, rows, logps * in_completion)
        lengths = completion.clamp(min=1)
        metrics = self.objective(sums, lengths, None)  # its "sft" term is replaced below
        chosen = rows < pairs
        tokens = chosen.sum().float()
        if self._trainer is not None and self.trainer.world_size > 1:  # the global batch's token mean
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum") / self.trainer.world_size
        nll = -logps[chosen].sum() / tokens.clamp(min=1)
        metrics["loss"] = metrics["loss"] - self.objective.chosen_nll(sums, lengths) + nll
        return metrics
