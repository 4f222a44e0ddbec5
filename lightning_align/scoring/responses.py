"""Scoring sampled responses (online RL): each row a left-padded prompt and a right-padded response, scored at
the response positions under a scoring plan."""

from __future__ import annotations

import torch
from torch import nn

from lightning_align.data.tokenize import IGNORE_INDEX
from lightning_align.losses import output_layer_logps
from lightning_align.scoring.forward import last_hidden_state, model_inputs
from lightning_align.scoring.model import body_of
from lightning_align.scoring.packing import pack_padded
from lightning_align.scoring.plan import ScoringPlan, output_weight


def response_forward(
    model: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    mask: torch.Tensor,
    plan: ScoringPlan,
    temperature: float = 1.0,
    want_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens of left-padded prompts + right-padded responses under `model`, with the
    logits scaled by the sampling temperature: [batch, response] (0 where `mask` is 0), and, with `want_hidden`,
    the last hidden states that predict them [batch, response, hidden] (for a value head; 0 where `mask` is 0 when
    packed).

    `plan.packing`: a packing plan (taken with the chunked output layer only) scores the rows packed without their
    padding (`packed_response_hidden`). `plan.output_layer`: "chunked" applies the output layer to the response
    positions only, a chunk at a time (no [batch, response, vocab] logits); "logits_to_keep" asks the model's
    forward for the response positions' logits; "full" takes all of them."""
    responses = sequences[:, prompt_length:]
    scored = mask.bool()
    logps = torch.zeros(responses.shape, dtype=torch.float32, device=sequences.device)
    if plan.packed and plan.output_layer == "chunked":
        hidden, tokens = packed_response_hidden(
            body_of(model), model, sequences, attention_mask, prompt_length, mask, plan
        )
        logps = logps.masked_scatter(scored, output_layer_logps(hidden / temperature, output_weight(model), tokens))
        if not want_hidden:
            return logps, None
        laid_out = hidden.new_zeros(*responses.shape, hidden.shape[-1])
        return logps, laid_out.masked_scatter(scored.unsqueeze(-1), hidden)
    inputs = {
        "input_ids": sequences,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }
    hidden = None
    if plan.output_layer == "chunked":
        hidden = body_of(model)(**inputs, use_cache=False).last_hidden_state[:, prompt_length - 1 : -1]
        logps = logps.masked_scatter(
            scored, output_layer_logps(hidden[scored] / temperature, output_weight(model), responses[scored])
        )
        return logps, hidden
    keep = {"logits_to_keep": responses.shape[1] + 1} if plan.output_layer == "logits_to_keep" else {}
    out = model(**model_inputs(inputs), use_cache=False, output_hidden_states=want_hidden, **keep)
    logits = out.logits[:, -responses.shape[1] - 1 : -1].float() / temperature
    token_logps = torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    if want_hidden:
        hidden = out.hidden_states[-1][:, prompt_length - 1 : -1]
    return token_logps * mask, hidden


def packed_response_hidden(
    body: nn.Module,
    model: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    mask: torch.Tensor,
    plan: ScoringPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states that predict the scored response tokens (`mask`), from the rows packed without
    their padding (`pack_padded`, as `plan.packing` says), in row-major order [K, hidden], and those tokens [K].

    Each row's tokens (its left-padded prompt and right-padded response) are one contiguous span, moved to the
    row's start and packed; the response tokens under `mask` are the labels."""
    rows, width = sequences.shape
    lengths = attention_mask.sum(-1)
    left_padding = prompt_length - attention_mask[:, :prompt_length].sum(-1)
    columns = torch.arange(width, device=sequences.device).expand(rows, width)
    source = (columns + left_padding[:, None]).clamp(max=width - 1)
    real = columns < lengths[:, None]
    labels = torch.full_like(sequences, IGNORE_INDEX)
    labels[:, prompt_length:] = sequences[:, prompt_length:].masked_fill(~mask.bool(), IGNORE_INDEX)
    one_row = plan.packing == "one_row"
    packed = pack_padded(
        sequences.gather(1, source) * real,
        real.long(),
        labels.gather(1, source).masked_fill(~real, IGNORE_INDEX),
        one_row=one_row,
    )
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    hidden = last_hidden_state(body, model, inputs, within_examples=one_row)[:, :-1]
    scored = packed["labels"][:, 1:] != IGNORE_INDEX
    order = torch.sort(packed["example"][:, 1:][scored], stable=True).indices  # row-major, as `mask` lists them
    return hidden[scored][order], packed["labels"][:, 1:][scored][order]
