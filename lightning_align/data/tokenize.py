"""Tokenise segments into `input_ids` and `labels` (-100 on unscored positions), with explicit truncation."""

from __future__ import annotations

import functools
from typing import Literal

from lightning_align.data.formats import Segments, turn_end
from lightning_align.data.sources import DataError, Row

IGNORE_INDEX = -100
Truncation = Literal["left", "error"]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by itself (Llama-style post-processors do)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


@functools.lru_cache(maxsize=16)
def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """The ids that close a reply: EOS, and the special token the chat template writes right after an assistant's
    content (its own end of turn). A role marker (ChatML's <|im_start|>, a template's <|assistant|>) never is."""
    enders = {tokenizer.eos_token_id} - {None}
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "QZXJ"}, {"role": "assistant", "content": "QZXJW"}]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template that renders no such pair (e.g. one that needs a system turn)
            return frozenset(enders)
        after = rendered.find("QZXJW") + len("QZXJW")
        marker = rendered[after : after + turn_end(rendered[after:], tokenizer, "")]
        ids = tokenizer(marker.strip(), add_special_tokens=False)["input_ids"] if marker.strip() else []
        enders |= {ids[-1]} if ids and ids[-1] in tokenizer.all_special_ids else set()
    return frozenset(enders)


def encode_segments(
    segments: Segments, tokenizer, row: Row, *, add_bos: bool, train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a row's segments, each segment tokenised on its own.

    Every scored segment ends its turn, so the model learns to stop: with EOS, added once, unless the text already
    ends with a special token that closes it (a chat template's own end of turn: Llama 3's <|eot_id|>, ChatML's
    <|im_end|>, Gemma's <end_of_turn>, Phi-3's <|end|>, or EOS itself). BOS is added only when asked and not
    already present, so it is never doubled.
    """
    eos = tokenizer.eos_token_id
    turn_enders = end_of_turn_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, scored in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if scored and eos is not None and not (ids and ids[-1] in turn_enders):
            ids = ids + [eos]
        input_ids += ids
        labels += ids if (scored or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and input_ids[:1] != [bos]:
        input_ids.insert(0, bos)
        labels.insert(0, bos if train_on_prompt else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(
            f"{row.where()}: no token is scored, so this row would train on nothing; the rendered text, scored "
            f"parts in [[...]]: {marked_text(input_ids, labels, tokenizer)!r}"
        )
    prompt_tokens = [t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX and t != bos]
    if not train_on_prompt and not prompt_tokens:
        raise DataError(
            f"{row.where()}: every token is scored, the prompt too (is the prompt empty, or does the chat template "
            "drop it?); pass train_on_prompt=True if that is meant. The rendered text, scored parts in [[...]]: "
            f"{marked_text(input_ids, labels, tokenizer)!r}"
        )
    return input_ids, labels


def marked_text(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """The decoded row with its scored spans in [[...]], for error messages."""
    parts, start = [], 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:end])
            parts.append(text if labels[start] == IGNORE_INDEX else f"[[{text}]]")
            start = end
    return "".join(parts)


class DroppedRow(Exception):
    """A row left out of the data (counted by reason in the data module's summary line), not an error."""


def truncate(
    sequences: list[tuple[list[int], list[int]]], max_length: int, policy: Truncation, row: Row
) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """Fit `(input_ids, labels)` sequences sharing one prompt (one SFT row, or a chosen/rejected pair) into
    `max_length` tokens; returns them and whether they were cut.

    policy "left": drop prompt tokens from the left, the same number from each sequence so the prompt stays
    shared, keeping at least a quarter of `max_length` of the prompt (all of it if shorter). A response is never
    cut, so it keeps its end of turn: a row whose responses do not fit beside that much prompt is dropped
    (`DroppedRow`). "error": refuse every row longer than `max_length`.
    """
    longest = max(len(input_ids) for input_ids, _ in sequences)
    if longest <= max_length:
        return sequences, False
    if policy == "error":
        raise DataError(
            f"{row.where()}: {longest} tokens, longer than max_length={max_length}; raise max_length, "
            "shorten the row, or set truncation='left'"
        )
    if policy != "left":
        raise ValueError(f"unknown truncation policy {policy!r}; use 'left' or 'error'")
    prompt_length = min(next(i for i, label in enumerate(labels) if label != IGNORE_INDEX) for _, labels in sequences)
    drop = min(longest - max_length, prompt_length - min(prompt_length, max_length // 4))
    if longest - drop > max_length:
        raise DroppedRow(f"response does not fit max_length={max_length} beside the kept prompt")
    return [(input_ids[drop:], labels[drop:]) for input_ids, labels in sequences], True
