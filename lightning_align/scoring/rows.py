"""Per-token log-probs of labelled rows (SFT, preference and unpaired batches) under a scoring plan."""

from __future__ import annotations

import torch
from torch import nn

from lightning_align.losses import (
    output_layer_logps,
    output_layer_nll,
    predicting_positions,
    sft_loss,
    sft_loss_at,
    token_logps,
    token_logps_at,
)
from lightning_align.scoring.attention import attention_within_examples
from lightning_align.scoring.forward import causal_lm_logits, last_hidden_state, model_inputs
from lightning_align.scoring.model import body_of
from lightning_align.scoring.packing import is_packed, pack_padded, right_padded, unpack
from lightning_align.scoring.plan import CHECKED_ROWS, SAFE_PLAN, ScoringPlan, output_weight


def scored_token_logps(
    model, batch: dict, output_layer: str = "full", within_examples: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label_t | prefix) at every scored position of a causal LM's batch, in row-major order [K], and the
    scored positions (`labels[:, 1:] != -100`, [batch, seq-1]).

    `output_layer` (see `ScoringPlan`): "chunked" applies the output layer at the scored positions only, a chunk
    of them at a time from the body's hidden states (`output_layer_logps`), so the [positions, vocab] logits are
    never held; "logits_to_keep" at the scored positions through the model's own forward; "full" everywhere."""
    labels = batch["labels"]
    scored = labels[:, 1:] != -100
    if output_layer == "chunked":
        hidden = last_hidden_state(body_of(model), model, batch, within_examples)
        return output_layer_logps(hidden[:, :-1][scored], output_weight(model), labels[:, 1:][scored]), scored
    if output_layer == "full":
        logps, _ = token_logps(causal_lm_logits(model, batch, within_examples), labels)
        return logps[scored], scored
    inputs = model_inputs(batch)
    with attention_within_examples(model, inputs, within_examples) as extra:
        logits = model(**inputs, **extra, use_cache=False, logits_to_keep=predicting_positions(labels)).logits
    return token_logps_at(logits, labels), scored


def plan_token_logps(model, batch: dict, plan: ScoringPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token of a padded (or already packed) batch: log-probs [K] and the batch row of each [K], each
    row's tokens in order. A packing plan scores a right-padded batch's rows packed without their padding."""
    labels = batch["labels"]
    if plan.packed and "attention_mask" in batch and right_padded(batch["attention_mask"]):
        packed = pack_padded(batch["input_ids"], batch["attention_mask"], labels, one_row=plan.packing == "one_row")
        packed_batch = {key: packed[key] for key in ("input_ids", "position_ids", "labels")}
        logps, scored = scored_token_logps(model, packed_batch, plan.output_layer, plan.packing == "one_row")
        return logps, packed["example"][:, 1:][scored]
    logps, scored = scored_token_logps(model, batch, plan.output_layer, plan.packing == "one_row")
    return logps, scored.nonzero()[:, 0]


def batch_scoring_plan(scoring, model, batch: dict, sharded: bool, packing: bool) -> ScoringPlan:
    """`scoring.plan` for a labelled batch (SFT-like, packed or padded; preference or unpaired): decided at the
    first batch, its fast path checked on a few of that batch's rows (examples, when packed) against the model's
    own padded forward."""
    if is_packed(batch):
        rows = unpack(batch, limit=CHECKED_ROWS)
    else:
        rows = {key: batch[key][:CHECKED_ROWS] for key in ("input_ids", "attention_mask", "labels")}
    return scoring.plan(
        model,
        lambda plan: in_row_order(*plan_token_logps(model, rows, plan)),
        batch["input_ids"].device,
        sharded=sharded,
        packing=packing,
    )


def in_row_order(logps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-token values sorted by batch row (stable, so each row's tokens stay in order): as a padded batch lists
    them, whichever layout scored them."""
    return logps[torch.sort(rows, stable=True).indices]


def response_logps(model: nn.Module, batch: dict, average: bool = False, plan: ScoringPlan = SAFE_PLAN) -> torch.Tensor:
    """Per-row sequence log-probs, scored as `plan` says (`plan_token_logps`); by default by the model's own
    padded forward."""
    labels = batch["labels"]
    logps, rows = plan_token_logps(model, batch, plan)
    sums = torch.zeros(len(labels), dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    return sums / (labels[:, 1:] != -100).sum(-1).clamp(min=1) if average else sums


def as_planned(batch: dict, plan: ScoringPlan) -> dict:
    """A packed batch unpacked into padded rows where the plan does not score packed rows; else the batch."""
    return unpack(batch) if is_packed(batch) and not plan.packed else batch


def planned_logits(model: nn.Module, batch: dict, plan: ScoringPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits of a labelled batch (as the plan lays it out) and the labels they score."""
    batch = as_planned(batch, plan)
    return causal_lm_logits(model, batch, plan.packing == "one_row"), batch["labels"]


def planned_nll(model: nn.Module, batch: dict, plan: ScoringPlan, num_scored_tokens=None) -> torch.Tensor:
    """`sft_loss` of a labelled batch, scored as `plan` says: packed batches stay packed only where the model's
    attention allows it (else they are unpacked and padded); the output layer is applied at the scored positions
    only, a chunk of them at a time with the gradients formed in the same pass (`output_layer_nll`) where the
    model allows it, else through Hugging Face's `logits_to_keep`."""
    batch = as_planned(batch, plan)
    within = plan.packing == "one_row"
    labels = batch["labels"]
    if plan.output_layer == "chunked":
        hidden = last_hidden_state(body_of(model), model, batch, within)
        scored = labels[:, 1:] != -100
        normaliser = scored.sum() if num_scored_tokens is None else num_scored_tokens
        return output_layer_nll(hidden[:, :-1][scored], output_weight(model), labels[:, 1:][scored], normaliser)
    if plan.output_layer == "full":
        return sft_loss(causal_lm_logits(model, batch, within), labels, num_scored_tokens=num_scored_tokens)
    inputs = model_inputs(batch)
    with attention_within_examples(model, inputs, within) as extra:
        logits = model(**inputs, **extra, use_cache=False, logits_to_keep=predicting_positions(labels)).logits
    return sft_loss_at(logits, labels, num_scored_tokens=num_scored_tokens)
