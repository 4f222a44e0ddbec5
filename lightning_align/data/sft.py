"""SFT data: prompt/completion or chat rows, loss on the completion (assistant) tokens only by default."""

from __future__ import annotations

from lightning_align.data.base import AlignDataModule
from lightning_align.data.collate import packed_collate, pad_collate
from lightning_align.data.formats import sft_segments
from lightning_align.data.sources import DataSource, Row
from lightning_align.data.tokenize import Truncation, encode_segments, truncate


class SFTDataModule(AlignDataModule):
    """Supervised fine-tuning data.

    Args:
        tokenizer: path or name of a Hugging Face tokenizer.
        train_data / val_data: a .jsonl / .json / .parquet file, a saved `datasets` folder, or a `datasets.Dataset`.
        val_fraction: share of train rows held out for validation when `val_data` is not given.
        max_length: longest row in tokens; `truncation` says what happens to longer rows ("left": drop prompt
            tokens from the left, keeping at least a quarter of max_length of the prompt, and drop the row if its
            response still does not fit; "error": refuse the row). One log line counts kept, truncated and
            dropped rows.
        train_on_prompt: score prompt tokens too (by default only completions / assistant replies are scored).
        packing: put each batch's rows into one padding-free row (positions restart per example, no attention
            across examples) instead of padding them to the longest.
        chat_template: a Jinja chat template to use instead of the tokenizer's.
        seed, shuffle: the training order is a permutation drawn from `seed` and the epoch (the same after a
            resume); `shuffle=False` keeps the file's order.
    """

    batch_kind = "sft"  # what it gives a module (`AlignModule.batch_kind`)

    def __init__(
        self,
        tokenizer: str,
        train_data: DataSource,
        val_data: DataSource | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        max_length: int = 1024,
        truncation: Truncation = "left",
        train_on_prompt: bool = False,
        packing: bool = False,
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
        self.train_on_prompt = train_on_prompt
        self.packing = packing

    def encode(self, row: Row) -> dict:
        is_chat = "messages" in row.fields
        input_ids, labels = encode_segments(
            sft_segments(row, self.tokenizer),
            self.tokenizer,
            row,
            add_bos=self.tokenizer_adds_bos and not is_chat,  # a chat template places BOS itself
            train_on_prompt=self.train_on_prompt,
        )
        [(input_ids, labels)], truncated = truncate([(input_ids, labels)], self.max_length, self.truncation, row)
        self.row_counts["truncated"] += truncated
        return {"input_ids": input_ids, "labels": labels, "row": row.number}

    def collate(self, examples: list[dict]) -> dict:
        return packed_collate(examples) if self.packing else pad_collate(examples, self.tokenizer.pad_token_id)
