"""The kinds of batches the method modules train on, and what a batch or an example holds."""

from __future__ import annotations

BATCH_KINDS = {
    "sft": "token sequences with labels",
    "preference": "preference pairs (chosen and rejected responses)",
    "prompts": "prompts to sample from",
    "unpaired": "answers marked desirable or undesirable",
    "unknown": "batches without input_ids",
}
DATA_MODULES = {
    "sft": "SFTDataModule",
    "preference": "PreferenceDataModule",
    "prompts": "PromptDataModule",
    "unpaired": "UnpairedPreferenceDataModule",
}


def batch_kind(batch: dict) -> str:
    if "pairs" in batch:
        return "preference"
    if "prompts" in batch:
        return "prompts"
    if "desirable" in batch:
        return "unpaired"
    return "sft" if "input_ids" in batch and "labels" in batch else "unknown"


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding (a packed batch has no padding and no attention mask)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def sequence_lengths(example) -> list[int]:
    """The lengths of every token sequence in an example (a pair has two; a prompt one)."""
    if isinstance(example, dict):
        own = [len(example["input_ids"])] if "input_ids" in example else []
        return own + [n for value in example.values() if isinstance(value, dict) for n in sequence_lengths(value)]
    return []
