"""Direct preference optimisation and its family (IPO, hinge, robust, EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP,
SimPO, ...), alone or as a weighted mixture."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from lightning_align.losses import length_desensitised_logps, wpo_weights
from lightning_align.modules.base import AlignModule, ModelSource
from lightning_align.modules.preference_objective import PreferenceObjective
from lightning_align.modules.ref_cache import (
    RefLogpsCache,
    examples_fingerprint,
    reference_weights,
    scored_examples,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from lightning_align.modules.reference import Reference, frozen
from lightning_align.scoring.plan import SAFE_PLAN, Scoring, ScoringPlan
from lightning_align.scoring.rows import batch_scoring_plan, plan_token_logps, response_logps

PREFERENCE_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def chosen_rejected_logps(
    model: nn.Module, batch: dict, average: bool = False, plan: ScoringPlan = SAFE_PLAN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the chosen and rejected halves of a preference batch, from one forward pass."""
    return response_logps(model, batch, average, plan).chunk(2)


class DPOModule(AlignModule):
    """Preference optimisation of a causal LM on `PreferenceDataModule` batches.

    Args:
        beta: strength of the implicit KL constraint (for SimPO, the reward scale; its paper uses about 2).
        loss_type: one loss or a list of them, weighted by `loss_weights` (as in MPO: ["sigmoid", "bco_pair",
            "sft"]): "sigmoid" (DPO), "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
            "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm" (formulas and papers in
            `losses.dpo_loss`), "simpo" (reference-free, `losses.simpo_loss`), "orpo" (reference-free odds
            ratio, `losses.orpo_loss`; `ORPOModule` pairs it with "sft") and "sft" (the chosen responses' negative
            log-likelihood, see `nll_average`). The logged rewards are the first preference type's, as TRL logs
            them: beta times the summed log-ratios (also for "ipo" and "sigmoid_norm", whose loss averages them).
        loss_weights: one weight per loss type (default 1 each).
        label_smoothing: assumed share of flipped labels, for "sigmoid" (cDPO, Mitchell 2023; TRL 1.16 ignores it
            for "sigmoid": leave it 0 for TRL's numbers), "robust", "aot", "aot_unpaired" and "simpo"; EXO's target
            epsilon for "exo_pair" (required there); refused where no type uses it.
        f_divergence_type: f-DPO's divergence (Wang et al. 2023): "reverse_kl" (DPO), "forward_kl",
            "js_divergence" or "alpha_divergence" (`losses.f_divergence_scores`), for "sigmoid", "hinge",
            "robust", "exo_pair" and "discopop"; f_alpha_divergence_coef: alpha of "alpha_divergence", as TRL's.
        nll_average: how the "sft" term and `rpo_alpha` average the chosen responses' NLL: "tokens" (default: the
            token mean over the batch's chosen tokens, as SFTModule and TRL) or "responses" (each response's
            token mean, then the mean over pairs, as the RPO paper: every pair weighs the same).
        bco_running_mean: for "bco_pair", shift the implicit rewards by their running mean (delta, BCO's paper);
            False uses delta = 0, as TRL.
        ipo_normalize: for "ipo", use length-averaged log-probs (policy and reference) as its authors recommend
            and TRL does; False uses sums.
        simpo_gamma: SimPO's target reward margin (refused unless "simpo" is a loss type).
        discopop_tau: DiscoPOP's modulation temperature (refused unless "discopop" is a loss type).
        ld_alpha: LD-DPO's length desensitisation (Liu et al. 2024): each pair's tokens beyond the shorter
            response's length count with this weight in both responses' log-probs, policy and reference
            (`losses.length_desensitised_logps`); None (default) counts every token in full.
        use_weighting: WPO (Zhou et al. 2024): weigh each pair's loss by how likely the policy is to produce both
            responses (`losses.wpo_weights`, detached). It needs every scored position's whole next-token
            distribution, so it costs one more forward pass without gradients, through the full output layer.
        rpo_alpha: weight of an extra negative log-likelihood term on the chosen responses, as in RPO (Pang et al.
            2024, "Iterative Reasoning Preference Optimization"); it keeps the chosen responses' likelihood from
            falling while the margin grows. 0 is plain DPO; averaged as `nll_average` says (TRL 1.16 has no
            rpo_alpha: its loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha] is the same).
        ref_model: a model name or folder to use as the reference instead of the starting policy.
        precompute_ref_logps: score the training and validation data with the reference once before training,
            then release the reference network.
        ref_cache_dir: a folder to keep the precomputed log-probs in and reuse in later runs (implies
            `precompute_ref_logps`). They are reused only if the data, the reference's weights, the tokenizer,
            `max_length` and the truncation are unchanged; otherwise, or if the file is damaged, they are
            recomputed and the log says why.
        padding_free: allow scoring a batch's rows packed together without their padding (`pack_padded`), for
            the policy and the reference, where the model's attention allows it (see `scoring_check`).
        scoring_check: how the fast scoring path is trusted (`Scoring`): "fallback" (default) compares it with
            the model's own padded forward on the first batch and takes a safer path where they differ, "error"
            stops instead, "off" trusts the families of the architecture grid only. One log line says which path
            each network takes.
        disable_dropout: switch dropout off in the policy (and so the reference), as TRL does for DPO: with it
            on, the policy's log-probs are noisy and the first loss is not log 2.
        Other arguments as `AlignModule`.

    The reference is picked automatically and reported at start: with a LoRA / QLoRA callback, the same network
    with its adapter disabled; otherwise a frozen copy of the starting policy.
    """

    batch_kind = "preference"
    shards_proven = True  # tests/distributed/test_fsdp.py (sigmoid and IPO, full and LoRA), not precomputed

    def __init__(
        self,
        model: ModelSource,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        ipo_normalize: bool = True,
        simpo_gamma: float = 0.5,
        discopop_tau: float = 0.05,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        nll_average: str = "tokens",
        bco_running_mean: bool = True,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        rpo_alpha: float = 0.0,
        ref_model: str | None = None,
        precompute_ref_logps: bool = False,
        ref_cache_dir: str | None = None,
        padding_free: bool = True,
        scoring_check: str = "fallback",
        disable_dropout: bool = True,
        **kwargs,
    ):
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        objective = PreferenceObjective(
            beta,
            tuple(loss_types),
            None if loss_weights is None else tuple(loss_weights),
            label_smoothing,
            ipo_normalize,
            simpo_gamma,
            discopop_tau,
            f_divergence_type,
            f_alpha_divergence_coef,
            nll_average,
            bco_running_mean,
        )
        if ld_alpha is not None and not 0 <= ld_alpha <= 1:
            raise ValueError(f"ld_alpha must be in [0, 1] (1 is plain DPO), got {ld_alpha}")
        super().__init__(model, **kwargs)
        self.objective = objective
        self.beta = beta
        self.loss_types = loss_types
        self.ld_alpha = ld_alpha
        self.use_weighting = use_weighting
        # BCO's reward shift: the running mean of the implicit rewards seen in training (checkpointed).
        self.bco_rewards = {"sum": 0.0, "count": 0}
        self.rpo_alpha = rpo_alpha
        self.ref_model_path = ref_model
        self.ref_cache_dir = ref_cache_dir
        self.padding_free = padding_free
        self.scoring = Scoring(scoring_check)
        self.disable_dropout = disable_dropout
        self.precompute_ref_logps = (precompute_ref_logps or ref_cache_dir is not None) and not self.reference_free
        self.reference: Reference | None = None
        orpo = ("log_odds_ratio", "log_odds_chosen") if "orpo" in loss_types else ()
        self.metric_names = PREFERENCE_METRICS + orpo
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in self.metric_names})

    @property
    def reference_free(self) -> bool:
        return self.objective.reference_free

    @property
    def uses_reference(self) -> bool:
        return not self.reference_free and self.ref_model_path is None

    def make_reference(self) -> None:
        if self.reference is None and not self.reference_free:
            explicit = None if self.ref_model_path is None else frozen(self.load_model(self.ref_model_path))
            self.reference = Reference(self.model, explicit)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference_free:
            rank_zero_info(f"DPOModule reference: none ({' + '.join(self.loss_types)} is reference-free)")
            return
        self.reference.to(self.model)
        kind = self.reference.kind
        if self.precompute_ref_logps:
            self.precompute_reference()
            kind = f"precomputed from the {kind}"
        rank_zero_info(f"DPOModule reference: {kind}")

    @torch.no_grad()
    def precompute_reference(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_set", None) is None:
            raise ValueError("precompute_ref_logps=True needs a PreferenceDataModule to write the log-probs into")
        splits = {"train": datamodule.train_set, "val": datamodule.val_set}
        cache = fingerprint = logps = None
        if self.ref_cache_dir is not None:
            cache = RefLogpsCache(self.ref_cache_dir)
            fingerprint = self.reference_fingerprint(datamodule) if self.trainer.is_global_zero else None
            rows = {split: len(examples) for split, examples in splits.items()}
            logps = cache.load(fingerprint, rows) if self.trainer.is_global_zero else None
            logps = self.trainer.strategy.broadcast(logps, src=0)
        if logps is None:
            logps = {split: self.computed_ref_logps(datamodule, examples) for split, examples in splits.items()}
            if cache is not None and self.trainer.is_global_zero:
                cache.save(fingerprint, logps)
        for split, examples in splits.items():
            for example, (chosen, rejected) in zip(examples, logps[split].tolist()):
                example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected
        self.reference = None  # released: every example now carries its reference log-probs

    def computed_ref_logps(self, datamodule, examples: list[dict]) -> torch.Tensor:
        """[rows, 2] reference log-probs of (chosen, rejected)."""

        def score(batch: dict) -> torch.Tensor:
            batch.pop("ref_chosen_logps", None), batch.pop("ref_rejected_logps", None)
            return torch.stack(self.reference_logps(batch), -1)

        return scored_examples(self, examples, datamodule.collate, datamodule.batch_size, score, width=2)

    def reference_fingerprint(self, datamodule) -> dict[str, str]:
        weights = reference_weights(self.model, self.reference)
        return {
            "train data": examples_fingerprint(datamodule.train_set),
            "val data": examples_fingerprint(datamodule.val_set),
            "rows": f"{len(datamodule.train_set)}+{len(datamodule.val_set)}",
            "reference": f"{self.reference.kind}:{weights_fingerprint(weights)}",
            "tokenizer": tokenizer_fingerprint(datamodule.tokenizer),
            "max_length": str(datamodule.max_length),
            "truncation": str(getattr(datamodule, "truncation", "")),
            "ld_alpha": str(self.ld_alpha),
        }

    def scoring_plan(self, model, batch: dict) -> ScoringPlan:
        """How `model` scores batches: decided (and checked on a few rows of this batch) at the first one."""
        return batch_scoring_plan(self.scoring, model, batch, self.weights_sharded, self.padding_free)

    def sequence_logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Each row's log-prob [2 * pairs] (with `ld_alpha`, length-desensitised within its pair)."""
        plan = self.scoring_plan(model, batch)
        if self.ld_alpha is None:
            return response_logps(model, batch, plan=plan)
        logps, rows = plan_token_logps(model, batch, plan)
        return torch.cat(length_desensitised_logps(logps, rows, len(batch["labels"]) // 2, self.ld_alpha))

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with self.reference(self.model) as reference:
            if self.ld_alpha is None:
                return chosen_rejected_logps(reference, batch, plan=self.scoring_plan(reference, batch))
            return self.sequence_logps(reference, batch).chunk(2)

    @torch.no_grad()
    def pair_weights(self, batch: dict) -> torch.Tensor:
        """WPO's weight of each pair, from the policy's next-token distributions at the scored positions."""
        from lightning_align.scoring.forward import causal_lm_logits

        labels = batch["labels"][:, 1:]
        scored = labels != -100
        log_probs = torch.log_softmax(causal_lm_logits(self.model, batch)[:, :-1][scored].float(), -1)
        token_logps = log_probs.gather(-1, labels[scored][:, None]).squeeze(-1)
        log_sum_sq = torch.logsumexp(2 * log_probs, -1)
        return wpo_weights(token_logps, log_sum_sq, scored.nonzero()[:, 0], len(labels) // 2)

    @property
    def bco_delta(self) -> float:
        return self.bco_rewards["sum"] / max(self.bco_rewards["count"], 1)

    def preference_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss and metrics of a batch, per example: the weighted sum of the loss types' losses."""
        # The reference first: sharded, its gathered weights are freed before the policy's forward holds its own.
        ref_sums = None if self.reference_free else torch.cat(self.reference_logps(batch))
        sums = self.sequence_logps(self.model, batch)
        lengths = (batch["labels"][:, 1:] != -100).sum(-1).clamp(min=1)
        tokens = self.nll_tokens(lengths)
        metrics = self.objective(sums, lengths, ref_sums, self.bco_delta, tokens)
        if self.use_weighting:
            metrics["loss"] = metrics["loss"] * self.pair_weights(batch)
        if self.rpo_alpha:
            metrics["loss"] = metrics["loss"] + self.rpo_alpha * self.objective.chosen_nll(sums, lengths, tokens)
        return metrics

    def nll_tokens(self, lengths: torch.Tensor):
        """The token count a "tokens"-averaged NLL divides by: under several processes the global batch's chosen
        tokens over the number of processes, so that their averaged gradients equal one process's."""
        uses_nll = "sft" in self.loss_types or self.rpo_alpha
        if not uses_nll or self.objective.nll_average != "tokens" or self._trainer is None:
            return None
        if self.trainer.world_size == 1:
            return None
        tokens = lengths.chunk(2)[0].sum().float()
        return self.trainer.strategy.reduce(tokens, reduce_op="sum") / self.trainer.world_size

    def step_loss(self, batch: dict) -> torch.Tensor:
        return self.preference_step(batch)["loss"].mean()

    def training_step(self, batch, batch_idx):
        metrics = self.preference_step(batch)
        if (
            "bco_pair" in self.loss_types and self.objective.bco_running_mean
        ):  # BCO's delta follows the implicit rewards of the batches trained on
            rewards = torch.cat([metrics["rewards/chosen"], metrics["rewards/rejected"]])
            self.bco_rewards["sum"] += float(rewards.double().sum())
            self.bco_rewards["count"] += len(rewards)
        loss = metrics.pop("loss").mean()
        batch_size = len(metrics["rewards/chosen"])
        # Averaged over the processes' equal micro-batches: the global batch's metrics, as one process logs them.
        sync = self._trainer is not None and self.trainer.world_size > 1
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        means = {name: values.mean() for name, values in metrics.items()}
        shown = ("rewards/accuracies", "rewards/margins")
        self.log_dict({name: means.pop(name) for name in shown}, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        self.log_dict(means, batch_size=batch_size, sync_dist=sync)
        return self.finite_or_none(loss, batch_idx)

    def validation_step(self, batch, batch_idx):
        for name, values in self.preference_step(batch).items():
            self.val_metrics[name.replace("/", "_")].update(values)

    def on_validation_epoch_start(self) -> None:
        for metric in self.val_metrics.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{name}": self.val_metrics[name.replace("/", "_")].compute() for name in self.metric_names}
        self.log_dict(metrics)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bco_rewards"] = dict(self.bco_rewards)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.bco_rewards = dict(checkpoint.get("bco_rewards", self.bco_rewards))
