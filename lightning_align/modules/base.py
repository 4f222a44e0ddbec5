"""What every method module shares: loading the model (shaped by adapter callbacks), the optimiser and schedule,
throughput logging and export in Hugging Face format."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_align.modules.batches import BATCH_KINDS, DATA_MODULES, batch_kind, real_tokens, sequence_lengths
from lightning_align.modules.checkpointing import checkpointing_mode, enable_checkpointing
from lightning_align.modules.optimisation import adamw, clip_gradients
from lightning_align.modules.pretrained import (
    disable_dropout,
    export_model,
    load_pretrained,
)
from lightning_align.modules.sharding import SHARDING_STRATEGIES, check_mesh, shard
from lightning_align.outputs import report_output_places
from lightning_align.scoring.model import unwrapped


class ModelAdapter:
    """Implemented by callbacks that shape the model as it is built (LoRA, QLoRA).

    The module asks its trainer's callbacks for one and calls `load_kwargs` before loading the weights (for
    quantisation) and `adapt` after; the module itself never knows which adapter, if any, is in use.
    """

    def load_kwargs(self, module: AlignModule) -> dict:
        return {}

    def adapt(self, model: nn.Module, module: AlignModule) -> nn.Module:
        return model

    def merged_copy(self, model: nn.Module, module: AlignModule) -> nn.Module:
        return model

    def merged_from_state(self, model: nn.Module, module: AlignModule, state: dict) -> nn.Module:
        return model


NONFINITE_POLICIES = ("stop", "skip")

if TYPE_CHECKING:
    ModelSource = str | nn.Module
else:
    # A model name or folder, or an `nn.Module` instance. The CLI reads the annotation at run time, where it is `str`:
    # as `str | nn.Module` its help listed every `nn.Module` subclass in the process (over 500 lines).
    ModelSource = str


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class AlignModule(L.LightningModule):
    """Base of the method modules.

    Args:
        model: a Hugging Face model name or folder (loaded in `configure_model`, so sharded strategies can build
            it), or an `nn.Module` instance.
        learning_rate, weight_decay, betas: AdamW settings (no weight decay on biases and norms).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to `learning_rate * min_lr_ratio`.
        gradient_checkpointing: recompute activations in the backward pass to save memory: True (or "full")
            reruns each decoder layer's whole forward; "selective" keeps the matrix products' and attention's
            outputs and reruns only the element-wise work between them (less memory than none, more than full, for
            less of the speed; see `modules/checkpointing.py`).
        torch_dtype: dtype to load the weights in ("float32", "bfloat16"); by default the checkpoint's.
        nonfinite: what a non-finite loss or gradient does: "stop" the run with a message naming the step and
            batch (the checkpoints written before stay as they are), or "skip" the update and count it
            (`train/skipped_steps`).
    """

    auto_class_name = "AutoModelForCausalLM"
    batch_kind = "sft"  # what `check_batch` expects: "sft", "preference" or "prompts"
    uses_reference = False  # DPO and PPO compare the policy with the model the stage started from
    shards_proven = False  # equal to one process under ModelParallelStrategy (FSDP2), as tests/distributed shows

    def __init__(
        self,
        model: ModelSource,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool | Literal["full", "selective"] = False,
        torch_dtype: str | None = None,
        nonfinite: str = "stop",
    ):
        if not learning_rate >= 0:
            raise ValueError(f"learning_rate must not be negative, got {learning_rate}")
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got {warmup_steps}, {min_lr_ratio}"
            )
        checkpointing_mode(gradient_checkpointing)  # an unknown value fails here, not at the first batch
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; valid: {', '.join(NONFINITE_POLICIES)}")
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else [])
        self.model_name_or_path = model if isinstance(model, str) else None
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.gradient_checkpointing = gradient_checkpointing
        self.torch_dtype = torch_dtype
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.model_ready = False
        self.batch_started_at: float | None = None

    # ----- the model ---------------------------------------------------------------------------------------------
    @property
    def adapter(self) -> ModelAdapter | None:
        if self._trainer is None:
            return None
        adapters = [cb for cb in self.trainer.callbacks if isinstance(cb, ModelAdapter)]
        if len(adapters) > 1:
            raise ValueError(f"more than one adapter callback: {adapters}; use one of LoRA, QLoRA")
        return adapters[0] if adapters else None

    def configure_model(self) -> None:
        if self.model_ready:
            return
        adapter = self.adapter
        if self.model is None:
            self.model = self.load_model(**(adapter.load_kwargs(self) if adapter else {}))
        enable_checkpointing(self.model, self.gradient_checkpointing)
        if adapter is not None:
            self.model = adapter.adapt(self.model, self)
        if getattr(self, "disable_dropout", False):  # the modules that take `disable_dropout` (DPO, reward, PPO)
            disable_dropout(self.model)
        # from_pretrained returns eval mode, and Lightning keeps module modes as they are: dropout would stay off.
        self.model.train()
        self.make_reference()
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy: FSDP2 over its data-parallel mesh
            self.shard_model()
        elif self.weights_sharded:
            rank_zero_warn(
                f"{type(self.trainer.strategy).__name__} is not verified by lightning-align's tests (they prove DDP, "
                "and ModelParallelStrategy for the modules that shard themselves); compare a short run with one process"
            )
        self.model_ready = True

    def make_reference(self) -> None:
        """Set up the reference network, if the method has one (before any sharding, which shards it too)."""

    def shard_model(self) -> None:
        """FSDP2 over the strategy's data-parallel mesh: the policy, and a frozen reference copy alike."""
        precomputed = getattr(self, "precompute_ref_logps", False)
        check_mesh(type(self).__name__, self.device_mesh, self.shards_proven, precomputed)
        for network in self.networks_to_shard():
            shard(network, self.device_mesh["data_parallel"])

    def networks_to_shard(self) -> list[nn.Module]:
        """The policy, and the method's other networks that are not part of it (a frozen reference copy, ...)."""
        reference = getattr(self, "reference", None)
        return [self.model, *([reference.network] if reference is not None and reference.network is not None else [])]

    def load_model(self, name_or_path: str | None = None, **kwargs) -> nn.Module:
        """The module's kind of Hugging Face model, from `name_or_path` (by default the module's own model)."""
        import transformers

        if self.torch_dtype is not None:
            kwargs.setdefault("dtype", getattr(torch, self.torch_dtype))
        name_or_path = name_or_path or self.model_name_or_path
        return load_pretrained(name_or_path, getattr(transformers, self.auto_class_name), **kwargs)

    @cached_property
    def tokenizer(self):
        """The tokenizer saved with the model (for scoring or decoding text inside the module)."""
        from lightning_align.data.base import load_tokenizer

        if self.model_name_or_path is None:
            raise ValueError("this module was given a model instance: it has no tokenizer folder to load")
        return load_tokenizer(self.model_name_or_path, what="model")

    # ----- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        optimizer = adamw(trainable, self.learning_rate, self.betas, self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 10**9
        if self.warmup_steps >= total:
            reached = cosine_with_warmup(total - 1, self.warmup_steps, total, self.min_lr_ratio)
            rank_zero_warn(
                f"warmup_steps={self.warmup_steps} is not shorter than the run ({total} optimiser steps): the learning "
                f"rate only reaches {reached:.0%} of learning_rate={self.learning_rate:g}; lower warmup_steps (a few "
                "percent of the run is usual)"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # fused under mixed precision too

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The gradients die with their step (Lightning would drop them after the next step's forward).
        optimizer.zero_grad(set_to_none=True)

    # ----- the step the planner measures ------------------------------------------------------------------------
    def step_losses(self, batch: dict) -> Iterator[torch.Tensor]:
        """The losses one optimiser step backpropagates on `batch`, each after the one before it has: what
        `lightning-align plan` measures, on fake tensors, to predict a run's memory. Every method's training
        step computes its loss through these same functions."""
        yield self.step_loss(batch)

    def step_loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no step_loss")

    # ----- non-finite losses and gradients ------------------------------------------------------------------------
    def finite_or_none(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        """The loss, or None (Lightning then skips the batch) when it is not finite and the policy is "skip"."""
        if torch.isfinite(loss).all():
            return loss
        self.nonfinite_found(f"loss is {loss.detach().float().flatten()[0].item()}", batch_idx)
        return None

    def gradients_finite(self, batch_idx: int | None = None) -> bool:
        """False (after dropping the gradients, so the optimiser leaves every weight alone) when a gradient is not
        finite and the policy is "skip"."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # One pass and one device sync: a NaN or inf makes the total norm non-finite. Only when it is (which
        # finite but huge gradients can also cause, by overflow) is every gradient checked on its own.
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            return True
        if all(torch.isfinite(g).all() for g in grads):
            return True
        self.nonfinite_found("a gradient is not finite", batch_idx)
        for p in self.parameters():
            p.grad = None
        return False

    def nonfinite_found(self, what: str, batch_idx: int | None) -> None:
        where = f"step {self.global_step}" + (f", batch {batch_idx}" if batch_idx is not None else "")
        if self.nonfinite == "stop":
            raise FloatingPointError(
                f"{type(self).__name__}: {what} at {where}; stopping (checkpoints written before are kept). "
                "Pass nonfinite='skip' to skip such updates instead"
            )
        self.skipped_steps += 1
        rank_zero_warn(f"{type(self).__name__}: {what} at {where}; update skipped ({self.skipped_steps} so far)")
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_before_optimizer_step(self, optimizer) -> None:
        self.gradients_finite(getattr(self.trainer.fit_loop.epoch_loop, "batch_idx", None))

    # ----- exact resume: the random state the next batch starts from (dropout, PPO's sampling) --------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["lightning_align"] = self.run_identity()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_same_run(checkpoint.get("lightning_align"))
        self.rng_to_restore = checkpoint.get("rng")

    # ----- the batches a module is fed ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Before the model loads: a data module of another kind than the method trains on.
        data_kind = getattr(self.trainer.datamodule, "batch_kind", None)
        if data_kind is not None and data_kind != self.batch_kind:
            raise ValueError(
                f"{type(self).__name__} trains on {BATCH_KINDS[self.batch_kind]}, but "
                f"{type(self.trainer.datamodule).__name__} gives {BATCH_KINDS[data_kind]}; use a "
                f"{DATA_MODULES[self.batch_kind]}"
                + (" (it also reads preference pairs, splitting each in two)" if self.batch_kind == "unpaired" else "")
            )
        scoring = getattr(self, "scoring", None)
        if scoring is not None and self.trainer.world_size > 1:  # every process takes the same scoring plan
            scoring.agree = functools.partial(self.trainer.strategy.reduce_boolean_decision, all=True)

    def check_batch(self, batch: dict) -> None:
        """Refuse, at the first batch, batches of another kind than the method needs (a `DPOModule` fed by an
        `SFTDataModule` would take each batch's halves as chosen and rejected)."""
        kind = batch_kind(batch)
        if kind != self.batch_kind and not (self.batch_kind == "sft" and kind == "unknown"):
            raise ValueError(
                f"{type(self).__name__} trains on {BATCH_KINDS[self.batch_kind]}, but the data gives "
                f"{BATCH_KINDS[kind]} (batch keys: {', '.join(sorted(batch))}); use a {DATA_MODULES[self.batch_kind]}"
            )

    # ----- what a checkpoint resumes: the same method, model and adapter ----------------------------------------
    def run_identity(self) -> dict[str, str | None]:
        adapter = self.adapter
        return {
            "module": type(self).__name__,
            "model": self.model_name_or_path,
            "adapter": type(adapter).__name__ if adapter is not None else None,
        }

    def check_same_run(self, saved: dict | None) -> None:
        """Refuse a checkpoint of another method, model or adapter: resuming continues the same run. (Older
        checkpoints carry no identity and are taken as they are.)"""
        if not saved:
            return
        ours = self.run_identity()
        differences = [
            f"{key} {saved.get(key)!r} (this run: {ours[key]!r})" for key in ours if saved.get(key) != ours[key]
        ]
        if differences:
            raise ValueError(
                f"the checkpoint is of another run: {'; '.join(differences)}. Resuming (ckpt_path) continues the "
                "same method, model and adapter. To start a new stage from an earlier one, give this module the "
                "earlier stage's export folder as its model (ExportPretrained, save_pretrained), or its LoRA "
                "adapter as LoRA(init_adapter=...)"
            )

    def restore_rng(self) -> None:
        # Applied at the first batch after a resume: set-up in between draws from the RNG in ways a run that was
        # never interrupted does not.
        rng, self.rng_to_restore = getattr(self, "rng_to_restore", None), None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ----- throughput --------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        report_output_places(self.trainer, "this run writes")
        self.check_row_lengths()

    # ----- rows the model cannot take ----------------------------------------------------------------------------
    def longest_row(self) -> int | None:
        """The most tokens a row of the data may have: the model's positions (None where it states none)."""
        config = getattr(unwrapped(self.model), "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def check_row_lengths(self) -> None:
        """Refuse, with a count, data whose rows the model has no positions for (a model past its positions
        computes without a word, and learns nothing useful there)."""
        limit = self.longest_row()
        datamodule = getattr(self.trainer, "datamodule", None)
        if limit is None or datamodule is None:
            return
        for split in ("train_set", "val_set"):
            lengths = [max(sequence_lengths(example)) for example in getattr(datamodule, split, None) or []]
            over = sum(n > limit for n in lengths)
            if over:
                raise ValueError(
                    f"{over} of {len(lengths)} {split.removesuffix('_set')} rows are longer than the {limit} tokens "
                    f"this model can take (longest: {max(lengths)}): {self.row_length_fix(limit)}"
                )

    def row_length_fix(self, limit: int) -> str:
        return f"set the data module's max_length to at most {limit} (longer rows are then cut or dropped, counted)"

    def on_fit_end(self) -> None:
        report_output_places(self.trainer, "this run wrote")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.check_batch(batch)
        self.restore_rng()
        self.batch_started_at = time.perf_counter()

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self.check_batch(batch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.batch_started_at is None or "input_ids" not in batch:
            return
        seconds = time.perf_counter() - self.batch_started_at
        tokens = real_tokens(batch)
        self.log("train/tokens_per_sec", tokens / max(seconds, 1e-9), on_step=True, on_epoch=False)

    @property
    def weights_sharded(self) -> bool:
        """Whether the strategy shards the weights: then the output layer is used through the model's forward."""
        return self._trainer is not None and type(self.trainer.strategy).__name__ in SHARDING_STRATEGIES

    # ----- export ------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, merge_adapter: bool = False, overwrite: bool = False) -> Path:
        """Save in Hugging Face format: the adapter alone (peft format), or with `merge_adapter` a plain model
        folder that `from_pretrained` loads. The tokenizer is saved alongside when the model came from a folder.

        Writes only its own files (`lightning_align.outputs`): into a new or empty folder, complete or not at all
        (written beside it and renamed into place); a folder that holds anything else is refused unless
        `overwrite=True`, which replaces only the files an export writes; a path that is a file is refused."""
        return export_model(self, Path(path), merge_adapter, overwrite)
