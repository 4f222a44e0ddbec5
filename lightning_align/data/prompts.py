"""Prompt-only data for on-policy methods (PPO, GRPO, RLOO, REINFORCE++): left-padded prompts, ready for batched
generation, with each row's other fields kept for reward functions (a verifier reads the reference answer)."""

from __future__ import annotations

import torch

from lightning_align.data.base import AlignDataModule
from lightning_align.data.formats import chat_messages, chat_template_check, text_field
from lightning_align.data.sources import DataError, DataSource, Row
from lightning_align.data.tokenize import Truncation

PROMPT_FIELDS = ("prompt", "messages")
# Where the answer of a chat row that ends with the assistant's turn goes (the turn is cut from the prompt).
ANSWER_FIELD = "answer"


def left_pad_collate(examples: list[dict], pad_token_id: int) -> dict:
    """Left padding keeps every prompt's last token next to the first generated one. `fields`: each row field
    other than the prompt, as a list over the batch (None where a row lacks it)."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, longest - n :] = torch.tensor(e["input_ids"])
        attention_mask[i, longest - n :] = 1
    names = sorted({name for e in examples for name in e.get("fields", {})})
    fields = {name: [e.get("fields", {}).get(name) for e in examples] for name in names}
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompts": [e["prompt"] for e in examples],
        "fields": fields,
    }
    if any(e.get("messages") for e in examples):  # chat rows' turns (None for a plain prompt), for episodes
        batch["messages"] = [e.get("messages") for e in examples]
    return batch


class PromptDataModule(AlignDataModule):
    """Prompts `{"prompt": text}` or chat rows `{"messages": [...]}` (rendered with the generation prompt).

    Args:
        max_length: longest prompt in tokens; `truncation="left"` keeps its end, `"error"` refuses the row.
        apply_chat_template: render a plain `prompt` as a user turn with the tokenizer's chat template (and the
            generation prompt), when the tokenizer has one: what a chat model was trained on. Set False for base
            models and for policies trained on plain prompt/completion text (the demo's), which see the prompt as
            it is written.
        Other arguments as `SFTDataModule`.

    A chat row whose last turn is the assistant's is sampled without that turn; its text is kept as the row's
    `answer` field (for reward functions that verify against it), and the log counts such rows. A row's other
    fields reach reward functions as keyword arguments of the same names.
    """

    batch_kind = "prompts"  # what it gives a module (`AlignModule.batch_kind`)

    def __init__(
        self,
        tokenizer: str,
        train_data: DataSource,
        val_data: DataSource | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        max_length: int = 512,
        truncation: Truncation = "left",
        apply_chat_template: bool = True,
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
        self.apply_chat_template = apply_chat_template

    @property
    def templated_prompts(self) -> bool:
        return self.apply_chat_template and getattr(self.tokenizer, "chat_template", None) is not None

    def encode(self, row: Row) -> dict:
        fields = {name: value for name, value in row.fields.items() if name not in PROMPT_FIELDS}
        chat_field = "messages" if "messages" in row.fields else "prompt"
        messages = None
        if isinstance(row.fields.get(chat_field), list):  # {"messages": [...]} or {"prompt": [...]} (TRL's form)
            if "messages" in row.fields and "prompt" in row.fields:
                raise DataError(f"{row.where()}: has both 'messages' and 'prompt'; a prompt row has one of them")
            chat_template_check(self.tokenizer, self.tokenizer_name)
            messages = chat_messages(row, chat_field)
            if messages[-1]["role"] == "assistant":
                if ANSWER_FIELD in fields:
                    raise DataError(
                        f"{row.where(ANSWER_FIELD)}: the row ends with the assistant's turn, which would be kept as "
                        f"'{ANSWER_FIELD}', but the row has that field already; drop one of them"
                    )
                fields[ANSWER_FIELD] = messages[-1]["content"]
                messages = messages[:-1]
                self.row_counts["assistant turns cut from the prompt (kept as 'answer')"] += 1
                if not messages:
                    raise DataError(f"{row.where('messages')}: only an assistant turn; there is no prompt to sample")
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            text, bos = prompt, []  # the chat template places BOS itself
        else:
            prompt = text_field(row, "prompt")
            if self.templated_prompts:
                text, bos = (
                    self.tokenizer.apply_chat_template(
                        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                    ),
                    [],
                )
                self.row_counts["prompts rendered with the chat template (apply_chat_template=False: as written)"] += 1
            else:
                text, bos = prompt, [self.tokenizer.bos_token_id] if self.tokenizer_adds_bos else []
        input_ids = bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(input_ids) > self.max_length:
            if self.truncation == "error":
                raise DataError(
                    f"{row.where('prompt')}: {len(input_ids)} tokens, longer than max_length={self.max_length}; "
                    "raise max_length, shorten the prompt, or set truncation='left'"
                )
            input_ids = input_ids[-self.max_length :]
            self.row_counts["truncated"] += 1
        # A chat row's turns too: multi-turn episodes continue the conversation from them.
        return {"input_ids": input_ids, "prompt": prompt, "messages": messages, "row": row.number, "fields": fields}

    def collate(self, examples: list[dict]) -> dict:
        return left_pad_collate(examples, self.tokenizer.pad_token_id)
