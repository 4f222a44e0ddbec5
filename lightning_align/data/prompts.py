"""Prompt-only data for on-policy methods (PPO): left-padded prompts, ready for batched generation."""

from __future__ import annotations

import torch

from lightning_align.data.base import AlignDataModule
from lightning_align.data.formats import chat_messages, text_field
from lightning_align.data.sources import DataError, DataSource, Row
from lightning_align.data.tokenize import Truncation


def left_pad_collate(examples: list[dict], pad_token_id: int) -> dict:
    """Left padding keeps every prompt's last token next to the first generated one."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, longest - n :] = torch.tensor(e["input_ids"])
        attention_mask[i, longest - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompts": [e["prompt"] for e in examples]}


class PromptDataModule(AlignDataModule):
    """Prompts `{"prompt": text}` or chat rows `{"messages": [...]}` (rendered with the generation prompt).

    Args:
        max_length: longest prompt in tokens; `truncation="left"` keeps its end, `"error"` refuses the row.
        Other arguments as `SFTDataModule`.
    """

    def __init__(
        self,
        tokenizer: str,
        train_data: DataSource,
        val_data: DataSource | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        max_length: int = 512,
        truncation: Truncation = "left",
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

    def encode(self, row: Row) -> dict:
        if "messages" in row.fields:
            text = self.tokenizer.apply_chat_template(
                chat_messages(row, "messages"), tokenize=False, add_generation_prompt=True
            )
            bos = []  # the chat template places BOS itself
        else:
            text = text_field(row, "prompt")
            bos = [self.tokenizer.bos_token_id] if self.tokenizer_adds_bos else []
        input_ids = bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(input_ids) > self.max_length:
            if self.truncation == "error":
                raise DataError(
                    f"{row.where('prompt')}: {len(input_ids)} tokens, longer than max_length={self.max_length}; "
                    "raise max_length, shorten the prompt, or set truncation='left'"
                )
            input_ids = input_ids[-self.max_length :]
        return {"input_ids": input_ids, "prompt": text, "row": row.number}

    def collate(self, examples: list[dict]) -> dict:
        return left_pad_collate(examples, self.tokenizer.pad_token_id)
