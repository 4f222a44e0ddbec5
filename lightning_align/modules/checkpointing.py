"""Activation checkpointing: the model's own (Hugging Face's `gradient_checkpointing_enable`, one checkpoint per
decoder layer), either full (the backward pass reruns each layer's whole forward) or selective (it keeps what
the layer's matrix products and attention kernels computed, and reruns only the element-wise and layout work
between them: norms, rotary embeddings, activations, copies).

Selective checkpointing changes no number: the rerun operators are deterministic and get the same inputs, so
the gradients equal those without checkpointing (tests/modules/test_checkpointing.py, across the architecture
grid). Of a Llama layer's MLP, which holds four [tokens, intermediate] tensors for its backward pass, it keeps two.
Measured on a CPU (benchmarks/NOTES.md, gqa shape): 7-12% less peak memory for 0-10% of the speed, where full
checkpointing, which keeps one tensor per layer and reruns every matrix product, saved 16-25% for 15-27%.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CHECKPOINTING_MODES = (False, True, "full", "selective")

aten = torch.ops.aten
# The operators whose outputs selective checkpointing keeps: matrix products and attention kernels. Everything else
# is rerun, which is cheap and always safe: a kept output that a later operator changes in place (a factory's
# buffer filled by dropout, say) would make the backward pass fail.
KEPT_OPERATORS = {
    aten.mm,
    aten.addmm,
    aten.bmm,
    aten.baddbmm,
    aten.convolution,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_fused_attention_overrideable,
    aten._flash_attention_forward,
    aten._efficient_attention_forward,
}


def rerun_cheap_operators(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep the outputs of `KEPT_OPERATORS`, rerun every other operator."""
    if getattr(op, "overloadpacket", None) in KEPT_OPERATORS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_mode(value: bool | str) -> str | None:
    """ "full", "selective" or None (off), from a module's `gradient_checkpointing` setting."""
    if value not in CHECKPOINTING_MODES:
        raise ValueError(
            f"gradient_checkpointing must be one of {', '.join(map(repr, CHECKPOINTING_MODES))}, got {value!r}"
        )
    if not value:  # False (or 0, which equals it)
        return None
    return "selective" if value == "selective" else "full"


def checkpointing_kwargs(value: bool | str) -> dict:
    """What `torch.utils.checkpoint.checkpoint` is called with for `value` (a module's `gradient_checkpointing`)."""
    kwargs = {"use_reentrant": False}
    if checkpointing_mode(value) == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, rerun_cheap_operators)
    return kwargs


def enable_checkpointing(model: nn.Module, value: bool | str) -> None:
    """Turn on the model's own activation checkpointing as `value` says (nothing for False)."""
    if checkpointing_mode(value) is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(value))
