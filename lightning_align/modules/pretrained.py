"""Hugging Face models in and out: loading a name or folder with a message a user can act on, dropout off, and
what an export writes beside the weights."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_align.assets import hub_problem, resolve_model, why_not_loaded
from lightning_align.modules.sharding import full_state_dict, is_sharded, without_tied_copies
from lightning_align.outputs import check_export_target, export_folder


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere in `model`: dropout layers (LoRA's included) and the dropout rates that Hugging Face
    attention modules keep as plain numbers. The model's config is left as it is, so exports keep their rates."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def load_pretrained(name_or_path: str, auto_class: type, **kwargs) -> nn.Module:
    path = resolve_model(name_or_path)
    problem = hub_problem(str(path))
    if problem:
        raise FileNotFoundError(f"model '{name_or_path}' could not be loaded: {problem}")
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"model '{name_or_path}' could not be loaded: {why_not_loaded(name_or_path, err)}"
        ) from None


def name_base_model(adapter_folder: Path, name_or_path: str) -> None:
    """Record the base model as the user named it (peft writes the resolved folder, e.g. the demo's cache)."""
    import json

    config_file = adapter_folder / "adapter_config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = name_or_path
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer_from(name_or_path: str, path: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(resolve_model(name_or_path)).save_pretrained(path)
    except (OSError, ValueError):
        rank_zero_info(f"no tokenizer saved with the model: none could be loaded from '{name_or_path}'")


def export_model(module, path: Path, merge_adapter: bool, overwrite: bool) -> Path:
    """`AlignModule.save_pretrained`: every process checks the target and takes part in gathering sharded
    weights; the first process writes."""
    check_export_target(path, overwrite)  # on every process, so all of them stop alike
    model = module.model
    adapter = module.adapter
    sharded = is_sharded(model)
    merging = merge_adapter and adapter is not None
    if merging and not sharded:
        model = adapter.merged_copy(model, module)
    # Every process takes part in the gather; an adapter export gathers the adapter alone, not the frozen base.
    state = full_state_dict(model, trained_only=adapter is not None and not merging) if sharded else None
    if module._trainer is None or module.trainer.is_global_zero:  # one writer under several processes
        if merging and sharded:  # merged into a whole copy built on this process alone
            model, state = adapter.merged_from_state(model, module, state), None
        elif sharded:
            state = without_tied_copies(model, state)
        with export_folder(path, overwrite) as staging:
            if hasattr(model, "peft_config"):  # the trained adapter only, not a frozen start copy beside it
                model.save_pretrained(staging, selected_adapters=["default"], state_dict=state)
                if module.model_name_or_path is not None:
                    name_base_model(staging, module.model_name_or_path)
            else:
                model.save_pretrained(staging, state_dict=state)
            (staging / "README.md").unlink(missing_ok=True)  # peft's empty model card: not ours to write
            if module.model_name_or_path is not None:
                save_tokenizer_from(module.model_name_or_path, staging)
    return path
