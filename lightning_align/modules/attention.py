"""Attention over packed rows that stays inside each example: a causal kernel per example, so no work is spent
on the pairs of tokens from different examples that a packed row's block mask would rule out. For CPUs, which
have no variable-length flash-attention kernel; everything else goes to Hugging Face's sdpa attention."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

WITHIN_EXAMPLES = "lightning_align_within_examples"


def packed_examples(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each example in each packed row: an example starts wherever the position restarts at 0."""
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, position in enumerate(row) if position == 0 or i == 0] + [len(row)]
        spans.append(list(zip(starts[:-1], starts[1:])))
    return spans


def within_examples_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Hugging Face attention-interface function: causal attention inside each example of `packed_examples`
    (passed down from the model's forward), or sdpa attention when none are given."""
    spans = kwargs.pop("packed_examples", None)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for row, row_spans in enumerate(spans):
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        parts = [
            F.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout, is_causal=True, scale=scaling
            )
            for a, b in row_spans
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(WITHIN_EXAMPLES, within_examples_attention)
AttentionMaskInterface.register(WITHIN_EXAMPLES, sdpa_mask)


def unwrapped(model):
    """The Hugging Face model inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attends_within_examples(model, device: torch.device) -> bool:
    """Whether the attention of packed rows costs only each example's own (so examples may share one row at no
    cost): this module's kernel (sdpa attention, on a CPU, no activation checkpointing, which would recompute
    the layers outside `attention_within_examples`) or Hugging Face's variable-length flash attention."""
    base = unwrapped(model)
    implementation = getattr(getattr(base, "config", None), "_attn_implementation", None) or ""
    if implementation.startswith("flash_attention"):
        return True
    return implementation == "sdpa" and device.type == "cpu" and not getattr(base, "is_activation_checkpointing", False)


@contextmanager
def attention_within_examples(model, inputs: dict) -> Iterator[dict]:
    """Extra forward arguments under which the attention of a packed batch (`position_ids` restarting at each
    example, no attention mask) stays inside each example, for the forward passes run in this context.

    Yields no arguments, and leaves the model as it is, unless the model uses sdpa attention on a CPU and no
    activation checkpointing (`attends_within_examples`).
    """
    base = unwrapped(model)
    packed = "position_ids" in inputs and inputs.get("attention_mask") is None
    sdpa = getattr(getattr(base, "config", None), "_attn_implementation", None) == "sdpa"
    if not (packed and sdpa and attends_within_examples(model, inputs["input_ids"].device)):
        yield {}
        return
    base.config._attn_implementation = WITHIN_EXAMPLES
    try:
        yield {"packed_examples": packed_examples(inputs["position_ids"])}
    finally:
        base.config._attn_implementation = "sdpa"
