"""A model's forward on a batch's model inputs, as training runs it: no KV cache, and per-example attention on
packed rows where the scoring plan takes it."""

from __future__ import annotations

import torch
from torch import nn

from lightning_align.scoring.attention import attention_within_examples

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def causal_lm_logits(model, batch: dict, within_examples: bool = False) -> torch.Tensor:
    # No KV cache in training: it is unused, and packed rows are recognised only without one.
    inputs = model_inputs(batch)
    with attention_within_examples(model, inputs, within_examples) as extra:
        return model(**inputs, **extra, use_cache=False).logits


def last_hidden_state(body: nn.Module, model: nn.Module, batch: dict, within_examples: bool = False) -> torch.Tensor:
    """The body's output on a batch's model inputs (the chunked output layer, a reward model's score head)."""
    inputs = model_inputs(batch)
    with attention_within_examples(model, inputs, within_examples) as extra:
        return body(**inputs, **extra, use_cache=False).last_hidden_state
