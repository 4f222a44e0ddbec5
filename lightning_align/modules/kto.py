"""KTO: alignment from unpaired feedback, single answers marked desirable or undesirable (Ethayarajh et al. 2024)."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from lightning_align.data.unpaired import fix_kl_completions
from lightning_align.losses import KTO_LOSS_TYPES, kto_kl, kto_loss
from lightning_align.modules.base import AlignModule, ModelSource
from lightning_align.modules.ref_cache import scored_examples
from lightning_align.modules.reference import Reference
from lightning_align.scoring.plan import Scoring, ScoringPlan
from lightning_align.scoring.rows import batch_scoring_plan, response_logps

# The paper's recommended range of lambda_D n_D / (lambda_U n_U) (section 4.2).
BALANCE_RANGE = (1.0, 4 / 3)


def batch_halves(batch: dict) -> tuple[dict, dict]:
    """The batch's B example rows and its B mismatched rows, as two batches."""
    half = len(batch["input_ids"]) // 2
    keys = ("input_ids", "attention_mask", "labels")
    return tuple({key: batch[key][part] for key in keys} for part in (slice(None, half), slice(half, None)))


class KTOModule(AlignModule):
    """KTO on `UnpairedPreferenceDataModule` batches.

    Args:
        beta: the value function's scale (the paper's default 0.1).
        loss_type: "kto" (default) or "apo_zero_unpaired" (APO-zero one answer at a time, TRL's name: no KL
            reference point, so the mismatched rows are not scored by the policy; `losses.kto_loss`).
        desirable_weight, undesirable_weight: lambda_D and lambda_U. The paper recommends lambda_D n_D /
            (lambda_U n_U) in [1, 4/3] (n_D, n_U: the desirable and undesirable training examples); a run outside
            it is warned about at start, with the weight that would bring it in.
        precompute_ref_logps: score the training and validation examples with the reference once before training
            (each with a fixed mismatched completion for its KL row, as TRL does) and release the reference: one
            forward fewer per step and no reference in memory.
        padding_free, scoring_check, disable_dropout: as `DPOModule`.
        Other arguments as `AlignModule`.

    The reference is the adapter-disabled policy under LoRA / QLoRA, else a frozen copy of the starting policy.
    Each batch also scores B mismatched prompt / answer rows (without autograd: no gradient flows through it) to
    estimate the KL reference point. Logs `train/loss`, `kl`, `rewards/desirable`, `rewards/undesirable`,
    `rewards/margins` (their difference) and the same with `val/`.
    """

    batch_kind = "unpaired"
    uses_reference = True
    shards_proven = True  # tests/distributed/test_fsdp.py, with a live reference

    def __init__(
        self,
        model: ModelSource,
        beta: float = 0.1,
        loss_type: str = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        precompute_ref_logps: bool = False,
        padding_free: bool = True,
        scoring_check: str = "fallback",
        disable_dropout: bool = True,
        **kwargs,
    ):
        if beta <= 0 or desirable_weight <= 0 or undesirable_weight <= 0:
            raise ValueError("beta, desirable_weight and undesirable_weight must be positive")
        if loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(KTO_LOSS_TYPES)}")
        super().__init__(model, **kwargs)
        self.beta, self.loss_type = beta, loss_type
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.precompute_ref_logps = precompute_ref_logps
        self.padding_free = padding_free
        self.scoring = Scoring(scoring_check)
        self.disable_dropout = disable_dropout
        self.reference: Reference | None = None
        self.val_desirable, self.val_undesirable, self.val_loss = MeanMetric(), MeanMetric(), MeanMetric()

    def make_reference(self) -> None:
        if self.reference is None:
            self.reference = Reference(self.model)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reference.to(self.model)
        kind = self.reference.kind
        datamodule = getattr(self.trainer, "datamodule", None)
        examples = getattr(datamodule, "train_set", None) or []
        desirable = sum(e["desirable"] for e in examples)
        if examples:
            self.check_balance(desirable, len(examples) - desirable)
        if self.precompute_ref_logps:
            self.precompute_reference(datamodule)
            kind = f"precomputed from the {kind}"
        rank_zero_info(f"KTOModule reference: {kind}")

    def precompute_reference(self, datamodule) -> None:
        if getattr(datamodule, "train_set", None) is None:
            raise ValueError(
                "precompute_ref_logps=True needs an UnpairedPreferenceDataModule to write the log-probs into"
            )

        def score(batch: dict) -> torch.Tensor:
            return torch.stack(self.reference_logps(batch), -1)

        for examples in (datamodule.train_set, datamodule.val_set):
            fix_kl_completions(examples)
            for example in examples:
                example.pop("ref_logps", None), example.pop("ref_kl_logps", None)
            logps = scored_examples(self, examples, datamodule.collate, datamodule.batch_size, score, width=2)
            for example, (ref, ref_kl) in zip(examples, logps.tolist()):
                example["ref_logps"], example["ref_kl_logps"] = ref, ref_kl
        self.reference = None  # released: every example now carries its reference log-probs

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's log-probs of the batch's examples [B] and of their mismatched rows [B]."""
        if "ref_logps" in batch:
            return batch["ref_logps"], batch["ref_kl_logps"]
        with self.reference(self.model) as reference:
            return response_logps(reference, batch, plan=self.scoring_plan(reference, batch)).chunk(2)

    def check_balance(self, desirable: int, undesirable: int) -> None:
        if not desirable or not undesirable:
            raise ValueError(
                f"KTO needs desirable and undesirable examples; the training data has {desirable} and {undesirable}"
            )
        balance = self.desirable_weight * desirable / (self.undesirable_weight * undesirable)
        low, high = BALANCE_RANGE
        if not low <= balance <= high:
            suggested = self.undesirable_weight * undesirable / desirable * (low + high) / 2
            rank_zero_warn(
                f"KTOModule: desirable_weight * {desirable} desirable / (undesirable_weight * {undesirable} "
                f"undesirable) = {balance:.2f}, outside the range [1, 4/3] that KTO's paper recommends; "
                f"desirable_weight={suggested:.3g} would bring it to {(low + high) / 2:.2f}"
            )

    def scoring_plan(self, model, batch: dict) -> ScoringPlan:
        """How `model` scores batches: decided (and checked on a few rows of this batch) at the first one."""
        return batch_scoring_plan(self.scoring, model, batch, self.weights_sharded, self.padding_free)

    def over_all_processes(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Per-row values of every process's micro-batch, concatenated (as TRL gathers them for the KL point): the
        reference point is the global batch's, as one process with the whole batch estimates it."""
        if self._trainer is None or self.trainer.world_size == 1:
            return list(values)
        return [self.all_gather(value.detach()).flatten() for value in values]

    def kto_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per example losses and rewards of a batch, and the batch's KL estimate."""
        examples, mismatched = batch_halves(batch)
        # The reference first: sharded, its gathered weights are freed before the policy's forward holds its own.
        ref, ref_kl = self.reference_logps(batch)
        policy = response_logps(self.model, examples, plan=self.scoring_plan(self.model, examples))
        if self.loss_type == "kto":
            with torch.no_grad():  # the reference point carries no gradient: no backward through these rows
                policy_kl = response_logps(self.model, mismatched, plan=self.scoring_plan(self.model, mismatched))
            kl = kto_kl(*self.over_all_processes(policy_kl, ref_kl))
        else:
            kl = policy.new_zeros(())
        losses, rewards = kto_loss(
            policy,
            ref,
            batch["desirable"],
            kl,
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
            self.loss_type,
        )
        return {"losses": losses, "rewards": rewards, "kl": kl}

    def step_loss(self, batch: dict) -> torch.Tensor:
        return self.kto_step(batch)["losses"].mean()

    def training_step(self, batch, batch_idx):
        out = self.kto_step(batch)
        loss = out["losses"].mean()
        desirable = batch["desirable"]
        metrics = {"kl": out["kl"]}
        if desirable.any():
            metrics["rewards/desirable"] = out["rewards"][desirable].mean()
        if (~desirable).any():
            metrics["rewards/undesirable"] = out["rewards"][~desirable].mean()
        sync = self._trainer is not None and self.trainer.world_size > 1  # the global batch's, as one process logs
        self.log("train/loss", loss, prog_bar=True, batch_size=len(desirable), sync_dist=sync)
        self.log_dict(metrics, batch_size=len(desirable))
        return self.finite_or_none(loss, batch_idx)

    def on_validation_epoch_start(self) -> None:
        for metric in (self.val_desirable, self.val_undesirable, self.val_loss):
            metric.reset()

    def validation_step(self, batch, batch_idx):
        out = self.kto_step(batch)
        desirable = batch["desirable"]
        self.val_loss.update(out["losses"])
        if desirable.any():
            self.val_desirable.update(out["rewards"][desirable])
        if (~desirable).any():
            self.val_undesirable.update(out["rewards"][~desirable])

    def on_validation_epoch_end(self) -> None:
        desirable, undesirable = self.val_desirable.compute(), self.val_undesirable.compute()
        self.log_dict(
            {
                "val/loss": self.val_loss.compute(),
                "val/rewards/desirable": desirable,
                "val/rewards/undesirable": undesirable,
                "val/rewards/margins": desirable - undesirable,
            },
            prog_bar=True,
        )
