"""LoRA and QLoRA as Lightning callbacks: adding one to the Trainer turns any module into an adapter run."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_align.modules.base import AlignModule, ModelAdapter, load_pretrained


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight packs two values per stored byte."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


class LoRA(L.Callback, ModelAdapter):
    """Low-rank adapters (Hu et al. 2021) on a frozen base, through peft.

    Args:
        r, alpha, dropout: adapter rank, scaling numerator (the update is scaled by alpha / r) and dropout.
        target_modules: "all-linear" (every linear layer but the output layer) or a list of module names.
        modules_to_save: extra modules trained in full and saved with the adapter; the module's own heads (a
            reward model's score head) are added automatically.
        save_dir: where the adapter is saved at the end of training (default: `<default_root_dir>/adapter`);
            with `merge_on_save`, a merged plain model is saved to `<save_dir>/merged` as well.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        modules_to_save: list[str] | None = None,
        save_dir: str | None = None,
        merge_on_save: bool = False,
    ):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = target_modules
        self.modules_to_save = list(modules_to_save or [])
        self.save_dir = save_dir
        self.merge_on_save = merge_on_save
        self.trainable_params = self.total_params = 0

    def lora_config(self, module: AlignModule):
        from peft import LoraConfig

        extra = list(getattr(module, "trained_heads", ()))
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save + [m for m in extra if m not in self.modules_to_save] or None,
        )

    def adapt(self, model: nn.Module, module: AlignModule) -> nn.Module:
        from peft import get_peft_model

        if module.gradient_checkpointing:
            # With a frozen embedding no input requires grad, and checkpointed blocks would pass no gradient back.
            model.enable_input_require_grads()
        model = get_peft_model(model, self.lora_config(module))
        self.trainable_params, self.total_params = count_parameters(model)
        rank_zero_info(
            f"{type(self).__name__}: {self.trainable_params:,} trainable of {self.total_params:,} parameters "
            f"({100 * self.trainable_params / self.total_params:.2f}%)"
        )
        return model

    def merged_copy(self, model: nn.Module, module: AlignModule) -> nn.Module:
        """A plain model with the adapter merged into a copy of the base weights."""
        return copy.deepcopy(model).merge_and_unload()

    def adapter_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.save_dir) if self.save_dir else Path(trainer.default_root_dir) / "adapter"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # The trained weights are in the checkpoint's state dict; the peft config lets a reader rebuild the model.
        checkpoint["adapter_config"] = pl_module.model.peft_config["default"].to_dict()
        if trainer.is_global_zero:
            pl_module.save_pretrained(self.adapter_dir(trainer) / f"step-{trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.adapter_dir(trainer)
        pl_module.save_pretrained(path)
        if self.merge_on_save:
            pl_module.save_pretrained(path / "merged", merge_adapter=True)


class QLoRA(LoRA):
    """LoRA on a base model whose linear layers are stored in 4 bits (Dettmers et al. 2023), through bitsandbytes.

    Args:
        quant_type: "nf4" (4-bit NormalFloat) or "fp4".
        double_quant: also quantise the quantisation constants (saves ~0.4 bits per weight).
        compute_dtype: dtype of the matrix products ("bfloat16" by default, "float32" or "float16").
        Other arguments as `LoRA`. The merged export reloads the base in full precision and merges into that,
        never into the 4-bit weights, so it needs the model as a name or folder.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        modules_to_save: list[str] | None = None,
        save_dir: str | None = None,
        merge_on_save: bool = False,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: str = "bfloat16",
    ):
        super().__init__(r, alpha, dropout, target_modules, modules_to_save, save_dir, merge_on_save)
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype

    def load_kwargs(self, module: AlignModule) -> dict:
        from transformers import BitsAndBytesConfig

        if module.model_name_or_path is None:
            raise ValueError("QLoRA quantises the weights while loading them: give the module a model name or folder")
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )
        return {"quantization_config": quantization, "device_map": {"": module.trainer.strategy.root_device}}

    def adapt(self, model: nn.Module, module: AlignModule) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=module.gradient_checkpointing)
        return super().adapt(model, module)

    def merged_copy(self, model: nn.Module, module: AlignModule) -> nn.Module:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        base = load_pretrained(module.model_name_or_path, type(model.get_base_model()), dtype=torch.float32)
        full = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
        set_peft_model_state_dict(full, get_peft_model_state_dict(model))
        return full.merge_and_unload()
