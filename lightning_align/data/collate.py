"""Collators: padded batches in Hugging Face form, or padding-free packed rows."""

from __future__ import annotations

import torch

from lightning_align.data.tokenize import IGNORE_INDEX


def pad_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: `input_ids`, `attention_mask`, `labels` (-100 on padding)."""
    longest = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), longest), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), longest), dtype=torch.long),
        "labels": torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.tensor(e["labels"])
    return batch


def packed_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate the rows into one row with no padding, `position_ids` restarting at 0 for each example.

    Hugging Face models read the restarting positions as separate sequences (no attention across examples) when
    no attention mask is given. The first label of each example is dropped: it would be predicted from the
    previous example's last token.
    """
    input_ids, labels, position_ids = [], [], []
    for e in examples:
        input_ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        position_ids += range(len(e["input_ids"]))
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([position_ids]),
    }
