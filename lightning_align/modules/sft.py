"""Supervised fine-tuning: next-token cross-entropy on completion tokens."""

from __future__ import annotations

import torch
from torchmetrics import SumMetric

from lightning_align.losses import sft_loss, token_logps
from lightning_align.modules.base import AlignModule
from lightning_align.scoring.forward import causal_lm_logits
from lightning_align.scoring.plan import Scoring, ScoringPlan
from lightning_align.scoring.rows import as_planned, batch_scoring_plan, planned_logits, planned_nll


class SFTModule(AlignModule):
    """Supervised fine-tuning of a causal LM on batches of `input_ids`, `attention_mask`, `labels` (-100 unscored).

    Trains from `SFTDataModule` or any DataLoader of such dicts (or of packed rows: `input_ids`, `labels`,
    `position_ids` restarting at 0 for each example, no attention mask). `scoring_check` as `DPOModule`'s.
    Logs `train/loss`, `val/loss`, `val/perplexity` (token-weighted over the whole validation set) and
    `train/tokens_per_sec`.

    Every scored token weighs the same in an optimiser step, however the step's tokens are split over
    accumulated micro-batches and processes: each micro-batch backpropagates its summed NLL (over a fixed scale),
    and before the step the gradients are rescaled by the step's total scored-token count over all processes.
    """

    # Keeps a summed loss's gradient in the range of a mean's; it cancels out before the optimiser step.
    GRADIENT_SCALE_TOKENS = 1024
    shards_proven = True  # tests/distributed/test_fsdp.py: full and LoRA, 2 processes equal to one

    def __init__(self, *args, scoring_check: str = "fallback", **kwargs):
        super().__init__(*args, **kwargs)
        self.scoring = Scoring(scoring_check)
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self.step_tokens = 0

    def loss(self, batch: dict) -> torch.Tensor:
        """`sft_loss` by the model's own forward (full logits), for checks and tests."""
        batch = as_planned(batch, self.scoring_plan(batch))
        return sft_loss(causal_lm_logits(self.model, batch), batch["labels"])

    def scoring_plan(self, batch: dict) -> ScoringPlan:
        """How the model scores batches: decided (and checked on a few of this batch's rows) at the first one."""
        return batch_scoring_plan(self.scoring, self.model, batch, self.weights_sharded, packing=True)

    def scored_loss(self, batch: dict, num_scored_tokens=None) -> torch.Tensor:
        """`sft_loss`, scored as the model's `ScoringPlan` says (`scoring.rows.planned_nll`)."""
        return planned_nll(self.model, batch, self.scoring_plan(batch), num_scored_tokens)

    def step_loss(self, batch: dict) -> torch.Tensor:
        """The summed NLL a training step backpropagates, over a fixed scale (see the class docstring)."""
        return self.scored_loss(batch, num_scored_tokens=self.GRADIENT_SCALE_TOKENS)

    def training_step(self, batch, batch_idx):
        scored = int((batch["labels"][:, 1:] != -100).sum())  # the first position is never predicted
        if scored == 0:
            raise ValueError(
                f"training batch {batch_idx} has no scored tokens (every label is -100): nothing to learn from; "
                "check the labels, or the data module's train_on_prompt and truncation settings"
            )
        self.step_tokens += scored
        summed = self.step_loss(batch)
        self.log("train/loss", self.global_mean(summed.detach() * self.GRADIENT_SCALE_TOKENS, scored), prog_bar=True)
        # Lightning divides the returned loss by accumulate_grad_batches; undo that, the rescale below replaces it.
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if self.finite_or_none(summed, batch_idx) is None:
            self.step_tokens -= scored
            return None
        return summed * accumulate

    def global_mean(self, nll_sum: torch.Tensor, tokens: int) -> torch.Tensor:
        """The NLL per token over every process's micro-batch (what one process with the whole batch logs)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return nll_sum / tokens
        both = self.trainer.strategy.reduce(torch.stack([nll_sum, nll_sum.new_tensor(tokens)]), reduce_op="sum")
        return both[0] / both[1]

    def on_before_optimizer_step(self, optimizer) -> None:
        tokens = torch.tensor(float(self.step_tokens), device=self.device)
        total = self.trainer.strategy.reduce(tokens, reduce_op="sum")  # data parallelism averages gradients
        scale = self.trainer.world_size * self.GRADIENT_SCALE_TOKENS / total.clamp(min=1)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self.step_tokens = 0
        super().on_before_optimizer_step(optimizer)

    def on_validation_epoch_start(self) -> None:
        # Reset here, inside the loop's own grad mode: states made under inference mode cannot be updated outside.
        self.val_nll.reset()
        self.val_tokens.reset()

    def validation_step(self, batch, batch_idx):
        logps, mask = token_logps(*planned_logits(self.model, batch, self.scoring_plan(batch)))
        self.val_nll.update(-logps.sum())
        self.val_tokens.update(mask.sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()}, prog_bar=True)
