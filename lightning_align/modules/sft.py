"""Supervised fine-tuning: next-token cross-entropy on completion tokens."""

from __future__ import annotations

import torch
from torchmetrics import SumMetric

from lightning_align.losses import sft_loss, token_logps
from lightning_align.modules.base import AlignModule, causal_lm_logits


class SFTModule(AlignModule):
    """Supervised fine-tuning of a causal LM on batches of `input_ids`, `attention_mask`, `labels` (-100 unscored).

    Trains from `SFTDataModule` or any DataLoader of such dicts. Logs `train/loss`, `val/loss`,
    `val/perplexity` (token-weighted over the whole validation set) and `train/tokens_per_sec`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()

    def loss(self, batch: dict) -> torch.Tensor:
        return sft_loss(causal_lm_logits(self.model, batch), batch["labels"])

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

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
