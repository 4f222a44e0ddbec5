"""Preference data: a prompt with a chosen and a rejected response, only response tokens scored."""

from __future__ import annotations

import torch

from lightning_align.data.base import AlignDataModule
from lightning_align.data.collate import pad_collate
from lightning_align.data.formats import preference_segments
from lightning_align.data.sources import DataError, DataSource, Row
from lightning_align.data.tokenize import DroppedRow, Truncation, encode_segments, truncate

# Per-example values that a batch carries along when every example has them.
EXTRA_FIELDS = ("margin", "ref_chosen_logps", "ref_rejected_logps")


def preference_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows, the B chosen sequences first, then the B rejected ones in the same order, so
    a single forward pass scores both."""
    batch = pad_collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_token_id)
    for field in EXTRA_FIELDS:
        if all(field in e for e in examples):
            batch[field] = torch.tensor([e[field] for e in examples], dtype=torch.float32)
    batch["row"] = torch.tensor([e["row"] for e in examples])
    batch["pairs"] = torch.tensor(len(examples))  # marks a preference batch: the modules check what they get
    return batch


class PreferenceDataModule(AlignDataModule):
    """Preference pairs `{"prompt", "chosen", "rejected"}` as plain text, or chat rows where `prompt` is a message
    list and `chosen` / `rejected` are the assistant messages that follow it. An optional numeric `margin` field
    is passed to the reward model's loss.

    Args:
        truncation: "left" drops prompt tokens from the left (the same from both sides, keeping at least a
            quarter of max_length of the prompt) and drops the pair if a response still does not fit; responses
            are never cut. "error" refuses rows longer than `max_length`.
        drop_identical: drop rows whose chosen and rejected responses are the same (counted in the log) instead
            of stopping with an error.
        Other arguments as `SFTDataModule`.
    """

    batch_kind = "preference"  # what it gives a module (`AlignModule.batch_kind`)

    def __init__(
        self,
        tokenizer: str,
        train_data: DataSource,
        val_data: DataSource | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        max_length: int = 1024,
        truncation: Truncation = "left",
        drop_identical: bool = False,
        chat_template: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__(
            tokenizer,
            train_data,
            val_data,
            val_fraction,
            batch_size,
            max_length,
            chat_template,
            num_workers,
            seed,
            shuffle,
        )
        self.truncation = truncation
        self.drop_identical = drop_identical

    def encode(self, row: Row) -> dict | None:
        prompt, chosen, rejected = preference_segments(row, self.tokenizer)
        if chosen != rejected and [" ".join(t.split()) for t, _ in chosen] == [
            " ".join(t.split()) for t, _ in rejected
        ]:
            self.row_counts["chosen and rejected differ only in whitespace (kept)"] += 1
        if chosen == rejected:
            if self.drop_identical:
                raise DroppedRow("chosen and rejected are identical")
            raise DataError(
                f"{row.where('rejected')}: identical to 'chosen', so the pair prefers nothing; fix the row or pass "
                "drop_identical=True to drop such rows"
            )
        add_bos = self.tokenizer_adds_bos and not isinstance(row.fields["chosen"], list)
        pair = [encode_segments(prompt + side, self.tokenizer, row, add_bos=add_bos) for side in (chosen, rejected)]
        [(chosen_ids, chosen_labels), (rejected_ids, rejected_labels)], truncated = truncate(
            pair, self.max_length, self.truncation, row
        )
        self.row_counts["truncated"] += truncated
        example = {
            "chosen": {"input_ids": chosen_ids, "labels": chosen_labels},
            "rejected": {"input_ids": rejected_ids, "labels": rejected_labels},
            "row": row.number,
        }
        if "margin" in row.fields:
            if not isinstance(row.fields["margin"], (int, float)):
                raise DataError(f"{row.where('margin')}: expected a number, got {type(row.fields['margin']).__name__}")
            example["margin"] = float(row.fields["margin"])
        return example

    def collate(self, examples: list[dict]) -> dict:
        return preference_collate(examples, self.tokenizer.pad_token_id)
