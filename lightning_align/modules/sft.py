"""Supervised fine-tuning: next-token cross-entropy on completion tokens."""

from __future__ import annotations

import torch
from torchmetrics import SumMetric

from lightning_align.losses import output_layer_nll, predicting_positions, sft_loss, sft_loss_at, token_logps
from lightning_align.modules.base import (
    MODEL_INPUTS,
    AlignModule,
    accepts_logits_to_keep,
    body_and_output_weight,
    causal_lm_logits,
    last_hidden_state,
)


class SFTModule(AlignModule):
    """Supervised fine-tuning of a causal LM on batches of `input_ids`, `attention_mask`, `labels` (-100 unscored).

    Trains from `SFTDataModule` or any DataLoader of such dicts. Logs `train/loss`, `val/loss`,
    `val/perplexity` (token-weighted over the whole validation set) and `train/tokens_per_sec`.

    Every scored token weighs the same in an optimiser step, however the step's tokens are split over
    accumulated micro-batches and processes: each micro-batch backpropagates its summed NLL (over a fixed scale),
    and before the step the gradients are rescaled by the step's total scored-token count over all processes.
    """

    # Keeps a summed loss's gradient in the range of a mean's; it cancels out before the optimiser step.
    GRADIENT_SCALE_TOKENS = 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self.step_tokens = 0

    def loss(self, batch: dict) -> torch.Tensor:
        return sft_loss(causal_lm_logits(self.model, batch), batch["labels"])

    def scored_loss(self, batch: dict, num_scored_tokens=None) -> torch.Tensor:
        """`sft_loss`, with the output layer applied at the scored positions only: a chunk of them at a time with
        the gradients formed in the same pass (`output_layer_nll`) when the model allows it, else through Hugging
        Face's `logits_to_keep`. Prompt positions never reach the [vocab]-wide logits."""
        split = None if self.weights_sharded else body_and_output_weight(self.model)
        if split is not None:
            body, weight = split
            labels = batch["labels"]
            hidden = last_hidden_state(body, self.model, batch)
            scored = labels[:, 1:] != -100
            normaliser = scored.sum() if num_scored_tokens is None else num_scored_tokens
            return output_layer_nll(hidden[:, :-1][scored], weight, labels[:, 1:][scored], normaliser)
        if not accepts_logits_to_keep(self.model):
            return sft_loss(causal_lm_logits(self.model, batch), batch["labels"], num_scored_tokens=num_scored_tokens)
        keep = predicting_positions(batch["labels"])
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        logits = self.model(**inputs, use_cache=False, logits_to_keep=keep).logits
        return sft_loss_at(logits, batch["labels"], num_scored_tokens=num_scored_tokens)

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
        logps, mask = token_logps(causal_lm_logits(self.model, batch), batch["labels"])
        self.val_nll.update(-logps.sum())
        self.val_tokens.update(mask.sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()}, prog_bar=True)
