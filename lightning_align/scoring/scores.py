"""Scalar scores from a sequence classifier's score head: a reward model's reward of each row, or a value model's
value at each response position, under a scoring plan."""

from __future__ import annotations

import torch
from torch import nn

from lightning_align.scoring.forward import last_hidden_state
from lightning_align.scoring.model import unwrapped
from lightning_align.scoring.packing import pack_padded, right_padded
from lightning_align.scoring.plan import ScoringPlan
from lightning_align.scoring.responses import packed_response_hidden


def batch_rewards(model: nn.Module, batch: dict, plan: ScoringPlan) -> torch.Tensor:
    """The reward of each row of a padded batch [batch]: with a packing plan (and a right-padded batch), from the
    rows packed without their padding, the score head applied at each row's last token; else by the model's own
    forward."""
    if plan.packed and right_padded(batch["attention_mask"]):
        body, head = body_and_score_head(model)
        one_row = plan.packing == "one_row"
        packed = pack_padded(batch["input_ids"], batch["attention_mask"], one_row=one_row)
        inputs = {key: packed[key] for key in ("input_ids", "position_ids")}
        hidden = last_hidden_state(body, model, inputs, within_examples=one_row)
        return head(hidden.flatten(0, 1)[packed["last"]]).squeeze(-1)
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return scores.logits.squeeze(-1)


def body_and_score_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and the `score` head of a Hugging Face sequence classifier (LoRA layers included),
    or None for other models."""
    base = unwrapped(model)
    body = getattr(base, "base_model", None)
    head = getattr(base, "score", None)
    if body is None or body is base or head is None or not type(base).__name__.endswith("ForSequenceClassification"):
        return None
    return body, head


def score_head_values(
    critic: nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    mask: torch.Tensor,
    plan: ScoringPlan,
) -> torch.Tensor:
    """A sequence classifier's score head at the positions that predict each response token: [batch, response]
    values, from the rows packed without their padding under a packing plan (0 where `mask` is 0), else from the
    padded rows."""
    if plan.packed:
        hidden, _ = packed_response_hidden(
            critic.base_model, critic, sequences, attention_mask, prompt_length, mask, plan
        )
        values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return values.masked_scatter(mask.bool(), critic.score(hidden).squeeze(-1).float())
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = critic.base_model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state[:, prompt_length - 1 : -1]
    return critic.score(hidden).squeeze(-1).float()
