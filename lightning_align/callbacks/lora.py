"""LoRA and QLoRA as Lightning callbacks: adding one to the Trainer turns any module into an adapter run."""

from __future__ import annotations

import copy
import enum
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_align.modules.base import AlignModule, ModelAdapter
from lightning_align.modules.checkpointing import checkpointing_kwargs
from lightning_align.modules.reference import START_ADAPTER
from lightning_align.modules.sharding import is_sharded
from lightning_align.outputs import check_export_target, holds_only_an_export, may_replace, run_output_dir


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight packs two values per stored byte."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


INIT_MODES = ("continue", "merge")


def layer_kind(name: str, module: nn.Module) -> str:
    """What an adapted layer is, by its name: attention, MLP, routed or shared experts, router, or other."""
    parts = name.lower().split(".")
    if any("shared_expert" in part for part in parts):
        return "shared experts"
    if "experts" in parts:
        return "routed experts"
    if parts[-1] in ("gate", "router") or "router" in type(module).__name__.lower():
        return "routers"
    if any("attn" in part or "attention" in part for part in parts):
        return "attention"
    if any(part in ("mlp", "feed_forward", "ffn") for part in parts):
        return "MLP"
    return "other"


def adapted_kinds(model: nn.Module) -> dict[str, int]:
    """How many layers of each kind carry an adapter (a layer adapting several of its parameters counts once)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not name.endswith(".base_layer"):
            kind = layer_kind(name, module)
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def has_routed_experts(model: nn.Module) -> bool:
    return any(name.split(".")[-1] == "experts" for name, _ in model.named_modules())


def plain_data(value):
    """Config values as plain Python types: checkpoints must load with `torch.load(weights_only=True)`."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [plain_data(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, enum.Enum):  # PeftType and TaskType are str enums: pickled, they would need peft
        return plain_data(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return type(value)(value) if value is not None else None
    return str(value)


def check_adapter_folder(path: str) -> None:
    if not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"init_adapter '{path}' is not a peft adapter folder: it has no adapter_config.json")


class LoRA(L.Callback, ModelAdapter):
    """Low-rank adapters (Hu et al. 2021) on a frozen base, through peft.

    Args:
        r, alpha, dropout: adapter rank, scaling numerator (the update is scaled by alpha / r) and dropout.
        target_modules: "all-linear" (every linear layer but the output layer) or a list of module names.
        target_parameters: parameters to adapt directly, for weights that are no linear layer: the routed experts
            of Mixture-of-Experts models, which Hugging Face stores as one 3-D parameter per projection, e.g.
            `["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]` (peft's `target_parameters`). The log line at
            start counts the adapted layers by kind (attention, MLP, routed / shared experts, routers).
        modules_to_save: extra modules trained in full and saved with the adapter; the module's own heads (a
            reward model's score head) are added automatically.
        save_dir: where the adapter is saved at the end of training (default: `<default_root_dir>/adapter`;
            without a `default_root_dir`, `adapter` in Lightning's checkpoint folder or the logger's version
            folder); with `merge_on_save`, a merged plain model is saved to `<save_dir>/merged` as well. With each
            checkpoint the adapter is also saved beside it, as `adapter-step-N` in the checkpoint folder. The
            folder follows the export contract (`ExportPretrained`): checked before the first step, new or empty
            unless `overwrite=True` (or a resumed run replacing its own earlier adapter).
        init_adapter: a peft adapter folder to start from (for example the adapter export of an SFT run).
        init_mode: "continue" (the default) trains that adapter further, keeping its own rank and targets; "merge"
            merges it into the base weights and adds a fresh adapter (r, alpha, ...) on top.

    Either way, DPO and PPO use the model the stage started from (base + `init_adapter`) as their reference, with
    no second copy of the base: "continue" keeps a frozen copy of the start adapter and switches to it, "merge"
    disables the new adapter.
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
        init_adapter: str | None = None,
        init_mode: str = "continue",
        target_parameters: list[str] | None = None,
        overwrite: bool = False,
    ):
        if init_mode not in INIT_MODES:
            raise ValueError(f"unknown init_mode {init_mode!r}; valid: {', '.join(INIT_MODES)}")
        self.init_adapter, self.init_mode = init_adapter, init_mode
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = target_modules
        self.target_parameters = list(target_parameters) if target_parameters else None
        self.modules_to_save = list(modules_to_save or [])
        self.save_dir = save_dir
        self.merge_on_save = merge_on_save
        self.overwrite = overwrite
        self.trainable_params = self.total_params = 0
        self.adapted_kinds: dict[str, int] = {}

    def lora_config(self, module: AlignModule):
        from peft import LoraConfig

        extra = list(getattr(module, "trained_heads", ()))
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            target_parameters=self.target_parameters,
            modules_to_save=self.modules_to_save + [m for m in extra if m not in self.modules_to_save] or None,
        )

    def adapt(self, model: nn.Module, module: AlignModule) -> nn.Module:
        from peft import get_peft_model

        if module.gradient_checkpointing:
            # With a frozen embedding no input requires grad, and checkpointed blocks would pass no gradient back.
            model.enable_input_require_grads()
        if self.init_adapter is not None and self.init_mode == "continue":
            model = self.continue_adapter(model, module)
        else:
            if self.init_adapter is not None:
                model = self.merge_start_adapter(model)
            model = get_peft_model(model, self.lora_config(module))
            model.start_adapter_merged = self.init_adapter  # read by the reference, to report what it is
        self.trainable_params, self.total_params = count_parameters(model)
        self.adapted_kinds = adapted_kinds(model)
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.adapted_kinds.items()))
        rank_zero_info(
            f"{type(self).__name__}: {self.trainable_params:,} trainable of {self.total_params:,} parameters "
            f"({100 * self.trainable_params / self.total_params:.2f}%); adapted layers: {kinds}"
        )
        if has_routed_experts(model) and not self.adapted_kinds.get("routed experts"):
            rank_zero_info(
                f"{type(self).__name__}: the routed experts are not adapted (their weights are no linear layers); "
                'to adapt them, add target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]'
            )
        return model

    def continue_adapter(self, model: nn.Module, module: AlignModule) -> nn.Module:
        from peft import PeftModel

        check_adapter_folder(self.init_adapter)
        model = PeftModel.from_pretrained(model, self.init_adapter, is_trainable=True)
        saved = set(model.peft_config["default"].modules_to_save or ())
        missing = [head for head in getattr(module, "trained_heads", ()) if head not in saved]
        if missing:
            raise ValueError(
                f"init_adapter '{self.init_adapter}' does not train the {', '.join(missing)} head that "
                f"{type(module).__name__} needs (it was not saved with the adapter): use init_mode='merge', which "
                "merges it into the base and trains a fresh adapter and head on top"
            )
        if getattr(module, "uses_reference", False):
            model.load_adapter(self.init_adapter, adapter_name=START_ADAPTER, is_trainable=False)
            model.set_adapter("default")
        config = model.peft_config["default"]
        rank_zero_info(f"{type(self).__name__}: continuing adapter '{self.init_adapter}' (r={config.r})")
        return model

    def merge_start_adapter(self, model: nn.Module) -> nn.Module:
        from peft import PeftModel

        check_adapter_folder(self.init_adapter)
        rank_zero_info(f"{type(self).__name__}: merging '{self.init_adapter}' into the base, then a fresh adapter")
        return PeftModel.from_pretrained(model, self.init_adapter).merge_and_unload()

    def merged_copy(self, model: nn.Module, module: AlignModule) -> nn.Module:
        """A plain model with the adapter merged into a copy of the base weights."""
        return copy.deepcopy(model).merge_and_unload(adapter_names=["default"])

    def merged_from_state(self, model: nn.Module, module: AlignModule, state: dict) -> nn.Module:
        """A plain, unsharded model with the adapter merged, from `state`: the whole state dict gathered from a
        sharded adapted model (base, adapter and trained heads alike, as training left them)."""
        from peft import get_peft_model

        full = get_peft_model(module.load_model(), copy.deepcopy(model.peft_config["default"]))
        missing = full.load_state_dict(state, strict=False).missing_keys  # a start adapter's keys are left aside
        if missing:
            raise ValueError(f"the gathered weights lack {len(missing)} of the model's, e.g. {missing[:3]}")
        return full.merge_and_unload(adapter_names=["default"])

    def adapter_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.save_dir) if self.save_dir else run_output_dir(trainer, "adapter")

    def output_place(self, trainer: L.Trainer) -> str:
        return f"adapter in {self.adapter_dir(trainer)}"

    def checkpoint_adapter_dir(self, trainer: L.Trainer) -> Path:
        """Where the adapter of a checkpoint goes: `adapter-step-N` in the checkpoint folder, or
        `<adapter_dir>/step-N` without a checkpoint callback."""
        checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
        if checkpoints:
            return Path(checkpoints) / f"adapter-step-{trainer.global_step}"
        return self.adapter_dir(trainer) / f"step-{trainer.global_step}"

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Checkpoints leave out the frozen base (rebuilt from the model folder on resume); see on_load_checkpoint.
        pl_module.strict_loading = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Only what training changes: the adapter, trained heads, metric states; not the frozen (maybe 4-bit) base.
        # Sharded, the base stays: a distributed checkpoint loads only into the whole set of names it was made from.
        frozen = {name for name, p in pl_module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        state = checkpoint["state_dict"]
        if not is_sharded(pl_module.model):
            for key in [k for k in state if k in frozen or k.rpartition(".weight.")[0] + ".weight" in frozen]:
                del state[key]
        # The peft config lets a reader rebuild the model around the trained weights.
        checkpoint["adapter_config"] = plain_data(pl_module.model.peft_config["default"].to_dict())
        # An adapter folder beside the checkpoints, loadable without Lightning, written by the first process. Sharded,
        # every process calls the export: all take part in gathering the weights (which also orders their checks of
        # the folder before the write); unsharded, the others would check it while the first one writes it.
        if is_sharded(pl_module.model) or trainer.is_global_zero:
            folder = self.checkpoint_adapter_dir(trainer)
            pl_module.save_pretrained(folder, overwrite=folder.is_dir() and holds_only_an_export(folder))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if "state_dict" not in checkpoint:  # a distributed checkpoint: the strategy loads every weight, strictly
            return
        trained = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        missing = [name for name in trained if name not in checkpoint["state_dict"]]
        if missing:  # loading is not strict (the base is left out), so check what must be there
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trained weights of this {type(self).__name__} run (first: "
                f"{missing[0]}); was it written with another adapter configuration?"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        # before the first step, once a resumed run's checkpoint is loaded (sharded strategies load it after fit start)
        folder = self.adapter_dir(trainer)
        check_export_target(folder, may_replace(trainer, folder, self.overwrite), "adapter")

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.adapter_dir(trainer)
        pl_module.save_pretrained(path, overwrite=may_replace(trainer, path, self.overwrite))
        if self.merge_on_save:
            merged = path / "merged"
            pl_module.save_pretrained(
                merged, merge_adapter=True, overwrite=may_replace(trainer, merged, self.overwrite)
            )


class QLoRA(LoRA):
    """LoRA on a base model whose linear layers are stored in 4 bits (Dettmers et al. 2023), through bitsandbytes.

    Args:
        quant_type: "nf4" (4-bit NormalFloat) or "fp4".
        double_quant: also quantise the quantisation constants (saves ~0.4 bits per weight).
        compute_dtype: dtype of the matrix products ("bfloat16" by default, "float32" or "float16").
        Other arguments as `LoRA` (a start adapter can only be continued: merging it would go into 4-bit weights).
        The merged export reloads the base in full precision and merges into that,
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
        init_adapter: str | None = None,
        init_mode: str = "continue",
        target_parameters: list[str] | None = None,
        overwrite: bool = False,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: str = "bfloat16",
    ):
        if init_adapter is not None and init_mode == "merge":
            raise ValueError(
                "QLoRA(init_mode='merge') would merge the start adapter into 4-bit weights and lose its precision: "
                "use init_mode='continue', or merge it into a full-precision model first (LoRA's merge_on_save "
                "export) and start QLoRA from that folder"
            )
        super().__init__(
            r,
            alpha,
            dropout,
            target_modules,
            modules_to_save,
            save_dir,
            merge_on_save,
            init_adapter,
            init_mode,
            target_parameters,
            overwrite,
        )
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

        # peft turns checkpointing on again here: with the module's own kind of it (full or selective).
        setting = module.gradient_checkpointing
        kwargs = checkpointing_kwargs(setting) if setting else None
        model = prepare_model_for_kbit_training(model, bool(setting), gradient_checkpointing_kwargs=kwargs)
        return super().adapt(model, module)

    def merged_copy(self, model: nn.Module, module: AlignModule) -> nn.Module:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        base = module.load_model(dtype=torch.float32)  # the module's own kind of model, heads included
        full = get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
        set_peft_model_state_dict(full, get_peft_model_state_dict(model))
        return full.merge_and_unload()
