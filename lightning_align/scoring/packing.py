"""Packed rows: several examples in one row without padding, `position_ids` restarting at 0 for each. Reading
them (spans, unpacking) and packing a right-padded batch's rows for scoring."""

from __future__ import annotations

import torch

from lightning_align.data.collate import pad_collate
from lightning_align.data.tokenize import IGNORE_INDEX


def is_packed(batch: dict) -> bool:
    """Whether a batch is packed rows: `position_ids` and no attention mask."""
    return "position_ids" in batch and batch.get("attention_mask") is None


def example_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each example in each packed row: an example starts wherever the position restarts at 0."""
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, position in enumerate(row) if position == 0 or i == 0] + [len(row)]
        spans.append(list(zip(starts[:-1], starts[1:])))
    return spans


def unpack(batch: dict, pad_token_id: int = 0, limit: int | None = None) -> dict[str, torch.Tensor]:
    """A packed batch's examples (the first `limit` of them) as a right-padded batch, for models that cannot
    score packed rows. Each example's first label is -100 in either form: no position of its own predicts it."""
    examples = [
        {"input_ids": batch["input_ids"][row, a:b].tolist(), "labels": batch["labels"][row, a:b].tolist()}
        for row, spans in enumerate(example_spans(batch["position_ids"]))
        for a, b in spans
    ][:limit]
    padded = pad_collate(examples, pad_token_id)
    return {key: value.to(batch["input_ids"].device) for key, value in padded.items()}


def pack_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    fill: int = 0,
    one_row: bool = False,
) -> dict[str, torch.Tensor]:
    """The rows of a right-padded batch, re-packed without their padding: first-fit-decreasing into as few rows
    as hold them, each as long as the longest row (or with `one_row`, all of them in one row: for attention
    whose cost is each example's own), `position_ids` restarting at 0 for each example (read by Hugging Face
    models as separate sequences when no attention mask is given).

    Returns `input_ids` and `position_ids` [packed rows, longest] (a packed row's unused tail is a sequence of
    `fill` tokens of its own), `example` [packed rows, longest] (the batch row each position came from, -1 on
    tails), `last` [batch] (where each example's last token lies in the flattened packed rows) and, given
    `labels`, the packed `labels` with -100 on tails and on each example's first token (which no position of
    its own predicts).
    """
    lengths = attention_mask.sum(dim=1).tolist()
    capacity = sum(lengths) if one_row else max(lengths)
    free: list[int] = []  # room left in each packed row
    placed: list[tuple[int, int]] = [(0, 0)] * len(lengths)  # (packed row, start column) of each example
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(capacity)
        placed[i] = (row, capacity - free[row])
        free[row] -= lengths[i]
    device, shape = input_ids.device, (len(free), capacity)
    packed = {
        "input_ids": torch.full(shape, fill, dtype=input_ids.dtype, device=device),
        "position_ids": torch.zeros(shape, dtype=torch.long, device=device),
        "example": torch.full(shape, -1, dtype=torch.long, device=device),
    }
    if labels is not None:
        packed["labels"] = torch.full(shape, IGNORE_INDEX, dtype=labels.dtype, device=device)
    last = []
    for i, (row, start) in enumerate(placed):
        n = lengths[i]
        span = slice(start, start + n)
        packed["input_ids"][row, span] = input_ids[i, :n]
        packed["position_ids"][row, span] = torch.arange(n, device=device)
        packed["example"][row, span] = i
        if labels is not None:
            packed["labels"][row, start + 1 : start + n] = labels[i, 1:n]
        last.append(row * capacity + start + n - 1)
    for row, room in enumerate(free):  # the tail restarts at 0 too, so it is no part of the example before it
        packed["position_ids"][row, capacity - room :] = torch.arange(room, device=device)
    packed["last"] = torch.tensor(last, device=device)
    return packed


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is its tokens, then padding (ones, then zeros)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
