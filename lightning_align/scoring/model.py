"""The parts of a Hugging Face model that scoring reaches into (the model inside a peft wrapper, its body), and
eval mode for a while."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def unwrapped(model):
    """The Hugging Face model inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval mode for the context, each submodule's own mode restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def body_of(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face model (to the last hidden state, LoRA layers included)."""
    base = unwrapped(model)
    return getattr(base, "base_model", base)
