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

from lightning_align.scoring.model import unwrapped
from lightning_align.scoring.packing import example_spans as packed_examples


def within_examples_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs
):
    """Hugging Face attention-interface function: causal attention inside each example of `packed_examples`
    (passed down from the model's forward), or sdpa attention when none are given.

    Honours what the model's own attention applies on top of causal attention: a sliding window (a band on the
    causal mask, as Hugging Face's masks: key k is seen from query q when q - window < k <= q) and tanh
    soft-capping of the scores. Anything else it does not know of is refused, never dropped."""
    spans = kwargs.pop("packed_examples", None)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    unknown = [name for name in UNHONOURED_ATTENTION_ARGUMENTS if kwargs.get(name) is not None]
    if unknown or getattr(module, "sinks", None) is not None:
        raise NotImplementedError(f"packed attention does not apply {unknown or ['sinks']}: score this model padded")
    if query.shape[1] != key.shape[1] and not plain_causal(softcap, sliding_window, spans):
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    rows = []
    for row, row_spans in enumerate(spans):
        q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
        # Each example's output as [1, length, heads, head_dim], so the joined row is already the layout the
        # output projection reads (no copy of the whole row to make it contiguous).
        parts = [
            example_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout, scaling, sliding_window, softcap
            ).transpose(1, 2)
            for a, b in row_spans
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows), None


def plain_causal(softcap: float | None, sliding_window: int | None, spans) -> bool:
    """Whether every example takes sdpa's own causal kernel (no soft-capping, no window shorter than it)."""
    longest = max((b - a for row_spans in spans for a, b in row_spans), default=0)
    return softcap is None and (sliding_window is None or sliding_window >= longest)


# Arguments some Hugging Face attention modules pass that change the result and that this kernel does not apply.
UNHONOURED_ATTENTION_ARGUMENTS = ("s_aux", "sinks", "attention_chunk_size", "chunk_size")


def example_attention(q, k, v, dropout: float, scaling: float, sliding_window: int | None, softcap: float | None):
    """Causal attention over one example [1, heads, length, head_dim], within a window and soft-capped if asked
    (key and value may have fewer heads, a divisor of the query's, only where it is plain causal attention)."""
    length = q.shape[2]
    if softcap is None and (sliding_window is None or sliding_window >= length):
        # Grouped-query attention reads each key/value head for its group of query heads, without repeating them.
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
    position = torch.arange(length, device=q.device)
    seen = position[None, :] <= position[:, None]
    if sliding_window is not None:
        seen &= position[None, :] > position[:, None] - sliding_window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, dropout_p=dropout, scale=scaling)
    # As the models' own eager attention: scale, cap, mask, softmax in float32.
    scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scaling / softcap) * softcap
    scores = scores.masked_fill(~seen, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


# The kernel answers to Hugging Face's own "sdpa" name: without `packed_examples` it is Hugging Face's sdpa
# attention itself; with them (passed only by this library, for packed rows) it attends inside each example. Under
# the same name, activation checkpointing's recomputation, which runs after our forward has returned but with the
# same keyword arguments, takes the same path.
AttentionInterface.register("sdpa", within_examples_attention)


def attends_within_examples(model, device: torch.device) -> bool:
    """Whether the attention of packed rows costs only each example's own (so examples may share one row at no
    cost): this module's kernel (sdpa attention on a CPU) or Hugging Face's variable-length flash attention."""
    base = unwrapped(model)
    implementation = getattr(getattr(base, "config", None), "_attn_implementation", None) or ""
    if implementation.startswith("flash_attention"):
        return True
    return implementation == "sdpa" and device.type == "cpu"


@contextmanager
def attention_within_examples(model, inputs: dict, enabled: bool = True) -> Iterator[dict]:
    """Extra forward arguments under which the attention of a packed batch (`position_ids` restarting at each
    example, no attention mask) stays inside each example: `packed_examples`, which the model passes down to its
    attention function (`within_examples_attention`, under the name "sdpa").

    Yields no arguments unless `enabled`, the batch is packed and the model uses sdpa attention on a CPU.
    """
    base = unwrapped(model)
    packed = "position_ids" in inputs and inputs.get("attention_mask") is None
    sdpa = getattr(getattr(base, "config", None), "_attn_implementation", None) == "sdpa"
    if not (enabled and packed and sdpa and inputs["input_ids"].device.type == "cpu"):
        yield {}
        return
    yield {"packed_examples": packed_examples(inputs["position_ids"])}
