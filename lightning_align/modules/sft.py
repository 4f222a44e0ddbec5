"""Supervised fine-tuning: next-token cross-entropy on completion tokens."""

from __future__ import annotations

import torch
from torchmetrics import SumMetric

from lightning_align.data.collate import is_packed, unpack
from lightning_align.losses import output_layer_nll, predicting_positions, sft_loss, sft_loss_at, token_logps
from lightning_align.modules.attention import attention_within_examples
from lightning_align.modules.base import (
    AlignModule,
    body_of,
    causal_lm_logits,
    in_row_order,
    last_hidden_state,
    model_inputs,
    plan_token_logps,
)
from lightning_align.modules.scoring import CHECKED_ROWS, Scoring, ScoringPlan, output_weight


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

    def __init__(self, *args, scoring_check: str = "fallback", **kwargs):
        super().__init__(*args, **kwargs)
        self.scoring = Scoring(scoring_check)
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self.step_tokens = 0

    def loss(self, batch: dict) -> torch.Tensor:
        """`sft_loss` by the model's own forward (full logits), for checks and tests."""
        if is_packed(batch) and not self.scoring_plan(batch).packed:
            batch = unpack(batch)
        return sft_loss(causal_lm_logits(self.model, batch), batch["labels"])

    def scoring_plan(self, batch: dict) -> ScoringPlan:
        """How the model scores batches: decided (and checked on a few of this batch's rows) at the first one."""

        def score(plan: ScoringPlan) -> torch.Tensor:  # called only while the plan is decided, not every step
            if is_packed(batch):
                rows = unpack(batch, limit=CHECKED_ROWS)
            else:
                rows = {key: batch[key][:CHECKED_ROWS] for key in ("input_ids", "attention_mask", "labels")}
            return in_row_order(*plan_token_logps(self.model, rows, plan))

        return self.scoring.plan(self.model, score, batch["input_ids"].device, sharded=self.weights_sharded)

    def scored_loss(self, batch: dict, num_scored_tokens=None) -> torch.Tensor:
        """`sft_loss`, scored as the model's `ScoringPlan` says: packed batches stay packed only where the model's
        attention allows it (else they are unpacked and padded); the output layer is applied at the scored
        positions only, a chunk of them at a time with the gradients formed in the same pass (`output_layer_nll`)
        where the model allows it, else through Hugging Face's `logits_to_keep`."""
        plan = self.scoring_plan(batch)
        if is_packed(batch) and not plan.packed:
            batch = unpack(batch)
        within = plan.packing == "one_row"
        labels = batch["labels"]
        if plan.output_layer == "chunked":
            hidden = last_hidden_state(body_of(self.model), self.model, batch, within)
            scored = labels[:, 1:] != -100
            normaliser = scored.sum() if num_scored_tokens is None else num_scored_tokens
            return output_layer_nll(
                hidden[:, :-1][scored], output_weight(self.model), labels[:, 1:][scored], normaliser
            )
        if plan.output_layer == "full":
            return sft_loss(causal_lm_logits(self.model, batch, within), labels, num_scored_tokens=num_scored_tokens)
        inputs = model_inputs(batch)
        with attention_within_examples(self.model, inputs, within) as extra:
            logits = self.model(**inputs, **extra, use_cache=False, logits_to_keep=predicting_positions(labels)).logits
        return sft_loss_at(logits, labels, num_scored_tokens=num_scored_tokens)

    def training_step(self, batch, batch_idx):
        scored = int((batch["labels"][:, 1:] != -100).sum())  # the first position is never predicted
        if scored == 0:
            raise ValueError(
                f"training batch {batch_idx} has no scored tokens (every label is -100): nothing to learn from; "
                "check the labels, or the data module's train_on_prompt and truncation settings"
            )
        self.step_tokens += scored
        summed = self.scored_loss(batch, num_scored_tokens=self.GRADIENT_SCALE_TOKENS)
        self.log("train/loss", summed.detach() * self.GRADIENT_SCALE_TOKENS / scored, prog_bar=True)
        # Lightning divides the returned loss by accumulate_grad_batches; undo that, the rescale below replaces it.
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if self.finite_or_none(summed, batch_idx) is None:
            self.step_tokens -= scored
            return None
        return summed * accumulate

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
        plan = self.scoring_plan(batch)
        if is_packed(batch) and not plan.packed:
            batch = unpack(batch)
        logps, mask = token_logps(causal_lm_logits(self.model, batch, plan.packing == "one_row"), batch["labels"])
        self.val_nll.update(-logps.sum())
        self.val_tokens.update(mask.sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()}, prog_bar=True)
