"""Unpaired feedback for KTO: single answers marked desirable or undesirable (a thumbs-up or thumbs-down)."""

from __future__ import annotations

import torch

from lightning_align.data.base import AlignDataModule
from lightning_align.data.collate import pad_collate
from lightning_align.data.formats import (
    chat_messages,
    completion_messages,
    preference_segments,
    render_chat,
    text_field,
)
from lightning_align.data.sources import DataError, DataSource, Row
from lightning_align.data.tokenize import Truncation, encode_segments, truncate


def mismatched_partner(examples: list[dict], i: int) -> dict:
    """The example before i (wrapping round), as TRL's KL rows take (completion i - 1 for prompt i), but from
    another source row: a pair split into two examples shares one prompt, so its other half would not be a
    mismatch (TRL would take it)."""
    for step in range(1, len(examples)):
        other = examples[(i - step) % len(examples)]
        if other["row"] != examples[i]["row"]:
            return other
    return examples[(i - 1) % len(examples)]


def fix_kl_completions(examples: list[dict]) -> None:
    """Give each example a fixed mismatched completion (its partner's in this list's order), so the reference
    log-probs of its KL row can be computed once, before training; the collate uses it instead of the batch's."""
    for i, e in enumerate(examples):
        other = mismatched_partner(examples, i)
        start = other["prompt_length"]
        e["kl_completion"] = (other["input_ids"][start:], other["labels"][start:])


def unpaired_collate(examples: list[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows: the B examples, then B mismatched ones (prompt i with the completion of the
    previous example from another row, or its fixed `kl_completion`), whose log-ratios estimate KTO's KL reference
    point; `desirable` [B] marks the batch as unpaired. Precomputed `ref_logps` / `ref_kl_logps` come along when every
    example has them."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    for i, e in enumerate(examples):
        if "kl_completion" in e:
            completion, completion_labels = e["kl_completion"]
        else:
            other = mismatched_partner(examples, i)
            completion = other["input_ids"][other["prompt_length"] :]
            completion_labels = other["labels"][other["prompt_length"] :]
        prompt = e["input_ids"][: e["prompt_length"]][-max(1, max_length - len(completion)) :]
        rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion_labels})
    batch = pad_collate(rows, pad_token_id)
    batch["desirable"] = torch.tensor([e["desirable"] for e in examples])
    batch["row"] = torch.tensor([e["row"] for e in examples])
    for field in ("ref_logps", "ref_kl_logps"):
        if all(field in e for e in examples):
            batch[field] = torch.tensor([e[field] for e in examples])
    return batch


class UnpairedPreferenceDataModule(AlignDataModule):
    """Answers with a thumbs-up or thumbs-down, for `KTOModule`.

    Rows: `{"prompt", "completion", "label": true|false}` as text; conversational `{"prompt": [messages],
    "completion": [messages], "label"}`; chat rows `{"messages": [...], "label"}` whose last turn (the
    assistant's) is the answer judged; or preference pairs `{"prompt", "chosen", "rejected"}`, each giving one
    desirable and one undesirable example (as TRL allows).

    Args:
        truncation: "left" drops prompt tokens from the left (keeping at least a quarter of max_length of it) and
            drops the row if the answer still does not fit; "error" refuses rows longer than `max_length`.
        Other arguments as `SFTDataModule`.
    """

    batch_kind = "unpaired"  # what it gives a module (`AlignModule.batch_kind`)

    def __init__(
        self,
        tokenizer: str,
        train_data: DataSource,
        val_data: DataSource | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        max_length: int = 1024,
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
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2: KTO estimates its KL term from mismatched rows of a batch")
        self.truncation = truncation

    def encode_rows(self, rows: list[Row]) -> list[dict]:
        return [example for examples in super().encode_rows(rows) for example in examples]

    def encode(self, row: Row) -> list[dict]:
        if "chosen" in row.fields or "rejected" in row.fields:
            prompt, chosen, rejected = preference_segments(row, self.tokenizer)
            add_bos = self.tokenizer_adds_bos and not isinstance(row.fields["chosen"], list)
            self.row_counts["preference pairs split into a desirable and an undesirable example"] += 1
            return [
                self.example(prompt + chosen, True, row, add_bos),
                self.example(prompt + rejected, False, row, add_bos),
            ]
        label = row.fields.get("label")
        if not isinstance(label, bool):
            hint = ""
            if isinstance(label, str) and label.strip().lower() in ("true", "false"):
                hint = f" (the string {label!r}; write the JSON boolean {label.strip().lower()}, without quotes)"
            elif isinstance(label, int):
                hint = f" (the number {label}; write the JSON boolean true or false)"
            raise DataError(
                f"{row.where('label')}: expected true (desirable) or false (undesirable), got "
                f"{'nothing' if label is None else repr(label)}{hint}"
            )
        if "messages" in row.fields:
            messages = chat_messages(row, "messages")
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{row.where('messages')}: the last turn must be the assistant's answer being judged")
            return [self.example(render_chat(messages, self.tokenizer, row, len(messages) - 1), label, row, False)]
        if isinstance(row.fields.get("prompt"), list):
            prompt = chat_messages(row, "prompt")
            completion = completion_messages(row, "completion", prompt)
            segments = render_chat(prompt + completion, self.tokenizer, row, len(prompt))
            return [self.example(segments, label, row, False)]
        segments = [(text_field(row, "prompt", allow_empty=True), False), (text_field(row, "completion"), True)]
        return [self.example(segments, label, row, self.tokenizer_adds_bos)]

    def example(self, segments, desirable: bool, row: Row, add_bos: bool) -> dict:
        ids, labels = encode_segments(segments, self.tokenizer, row, add_bos=add_bos)
        [(ids, labels)], truncated = truncate([(ids, labels)], self.max_length, self.truncation, row)
        self.row_counts["truncated"] += truncated
        prompt_length = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        return {
            "input_ids": ids,
            "labels": labels,
            "prompt_length": prompt_length,
            "desirable": desirable,
            "row": row.number,
        }

    def collate(self, examples: list[dict]) -> dict:
        return unpaired_collate(examples, self.tokenizer.pad_token_id, self.max_length)
