"""Reward model: a scalar head on a language model, trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_align.data.collate import pad_collate
from lightning_align.data.sources import Row
from lightning_align.data.tokenize import adds_bos, encode_segments
from lightning_align.losses import pairwise_reward_loss
from lightning_align.modules.base import AlignModule, ModelSource
from lightning_align.scoring.plan import CHECKED_ROWS, Scoring, ScoringPlan
from lightning_align.scoring.scores import batch_rewards, body_and_score_head


class RewardModule(AlignModule):
    """A scalar reward model, `AutoModelForSequenceClassification` with one label, the score read at the last
    non-padding token. Loads from a causal LM checkpoint (new score head) or an existing reward model.

    Trains on `PreferenceDataModule` batches with `pairwise_reward_loss` (a row's optional `margin` is the
    required gap). Logs `train/loss`, `train/accuracy`, `val/loss`, `val/accuracy` (share of pairs with
    r+ > r-) and `val/margin` (mean r+ - r-).

    Args:
        padding_free: allow scoring the batch's rows packed together without their padding (`pack_padded`), with
            the score head applied at each row's last token, where the model allows it (a Hugging Face sequence
            classifier with a `score` head whose attention packs; see `scoring_check`).
        scoring_check, disable_dropout: as `DPOModule` (dropout makes the chosen and rejected scores noisy).
        center_rewards_coefficient: weight of the reward-centring term c mean((r+ + r-)^2) (TRL's name; its
            docs suggest 0.01); 0 (default) leaves it out. `val/loss` is the pairwise loss alone.
        others: as `AlignModule`.
    """

    batch_kind = "preference"
    shards_proven = True  # tests/distributed/test_fsdp.py

    auto_class_name = "AutoModelForSequenceClassification"
    trained_heads = ("score",)  # trained in full and saved alongside a LoRA adapter

    def __init__(
        self,
        model: ModelSource,
        padding_free: bool = True,
        scoring_check: str = "fallback",
        disable_dropout: bool = True,
        center_rewards_coefficient: float = 0.0,
        **kwargs,
    ):
        if center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        super().__init__(model, **kwargs)
        self.padding_free = padding_free
        self.scoring = Scoring(scoring_check)
        self.disable_dropout = disable_dropout
        self.center_rewards_coefficient = center_rewards_coefficient
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()

    def load_model(self, name_or_path: str | None = None, **kwargs) -> nn.Module:
        kwargs.setdefault("num_labels", 1)
        model = super().load_model(name_or_path, **kwargs)
        if model.config.pad_token_id is None:  # needed to find each row's last token
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of the chosen and rejected halves of a preference batch, from one forward pass."""
        return batch_rewards(self.model, batch, self.scoring_plan(batch)).float().chunk(2)

    def scoring_plan(self, batch: dict) -> ScoringPlan:
        rows = {key: batch[key][:CHECKED_ROWS] for key in ("input_ids", "attention_mask")}
        # Sharded, the score head runs only inside the model's own forward (which gathers the root's weights).
        packing = self.padding_free and body_and_score_head(self.model) is not None and not self.weights_sharded
        return self.scoring.plan(
            self.model,
            lambda plan: batch_rewards(self.model, rows, plan),
            batch["input_ids"].device,
            sharded=self.weights_sharded,
            packing=packing,
        )

    def reward_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairwise loss of a preference batch and the rewards of its chosen and rejected halves."""
        chosen, rejected = self.rewards(batch)
        loss = pairwise_reward_loss(chosen, rejected, batch.get("margin"), self.center_rewards_coefficient)
        return loss, chosen, rejected

    def step_loss(self, batch: dict) -> torch.Tensor:
        return self.reward_step(batch)[0]

    def training_step(self, batch, batch_idx):
        loss, chosen, rejected = self.reward_step(batch)
        sync = self._trainer is not None and self.trainer.world_size > 1  # the global batch's, as one process logs
        self.log("train/loss", loss, prog_bar=True, batch_size=len(chosen), sync_dist=sync)
        accuracy = (chosen > rejected).float().mean()
        self.log("train/accuracy", accuracy, prog_bar=True, batch_size=len(chosen), sync_dist=sync)
        return self.finite_or_none(loss, batch_idx)

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_loss, self.val_accuracy, self.val_margin):
            metric.reset()

    def validation_step(self, batch, batch_idx):
        chosen, rejected = self.rewards(batch)
        self.val_loss.update(pairwise_reward_loss(chosen, rejected, batch.get("margin")), weight=len(chosen))
        self.val_accuracy.update((chosen > rejected).float())
        self.val_margin.update(chosen - rejected)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(
            {
                "val/loss": self.val_loss.compute(),
                "val/accuracy": self.val_accuracy.compute(),
                "val/margin": self.val_margin.compute(),
            },
            prog_bar=True,
        )

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards of plain-text (prompt, response) pairs, tokenised and scored as in training (packed without
        padding where the scoring plan allows): [len(prompts)]."""
        add_bos = adds_bos(self.tokenizer)
        examples = []
        for number, (prompt, response) in enumerate(zip(prompts, responses, strict=True), start=1):
            row = Row("<score>", number, {"prompt": prompt, "response": response})
            ids, labels = encode_segments([(prompt, False), (response, True)], self.tokenizer, row, add_bos=add_bos)
            examples.append({"input_ids": ids, "labels": labels})
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(examples), batch_size):
            batch = pad_collate(examples[start : start + batch_size], self.tokenizer.pad_token_id)
            batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
            scores.append(batch_rewards(self.model, batch, self.scoring_plan(batch)).float())
        return torch.cat(scores)
