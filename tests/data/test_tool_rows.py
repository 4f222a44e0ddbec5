"""SFT and preference rows with tool calls (assistant `tool_calls`, then `tool` results, as TRL and OpenAI write
them): only the assistant's tokens are scored, its tool calls included; tool results and the prompt are not."""

import pytest

from lightning_align import DataError, PreferenceDataModule, SFTDataModule
from lightning_align.data.tokenize import marked_text
from lightning_align.demos.tiny import TOOL_CHAT_TEMPLATE
from tests.conftest import write_jsonl

ADD = {"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}
PARAMETERS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": PARAMETERS}}]


def setup(dm):
    dm.setup("fit")
    return dm


def conversation(final="42"):
    return [
        {"role": "user", "content": "12+30?"},
        {"role": "assistant", "content": None, "tool_calls": [ADD]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": final},
    ]


def test_sft_scores_the_tool_call_and_the_answer_but_not_the_tool_result(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": conversation(), "tools": TOOLS}] * 2)
    dm = setup(SFTDataModule(tiny_model, str(path), chat_template=TOOL_CHAT_TEMPLATE, val_fraction=0.0))
    example = dm.train_set[0]
    text = marked_text(example["input_ids"], example["labels"], dm.tokenizer)
    call = '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call></s>'
    assert text == (
        f"<s><|system|>tools: add(a, b)\n<|user|>12+30?\n<|assistant|>[[{call}]]<|tool|>42\n<|assistant|>[[42</s>]]"
    )


def test_preference_rows_score_each_sides_calls_and_answers(tiny_model, tmp_path):
    prompt = conversation()[:1]
    row = {"prompt": prompt, "chosen": conversation("42")[1:], "rejected": conversation("43")[1:]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row] * 2)
    dm = setup(PreferenceDataModule(tiny_model, str(path), chat_template=TOOL_CHAT_TEMPLATE, val_fraction=0.0))
    example = dm.train_set[0]
    chosen = marked_text(example["chosen"]["input_ids"], example["chosen"]["labels"], dm.tokenizer)
    rejected = marked_text(example["rejected"]["input_ids"], example["rejected"]["labels"], dm.tokenizer)
    assert chosen.endswith("</tool_call></s>]]<|tool|>42\n<|assistant|>[[42</s>]]")
    assert rejected.endswith("</tool_call></s>]]<|tool|>42\n<|assistant|>[[43</s>]]")


@pytest.mark.parametrize(
    "message, error",
    [
        ({"role": "assistant", "content": None, "tool_calls": "add"}, r"messages\[1\]': 'tool_calls' must be"),
        ({"role": "assistant", "content": "", "tool_calls": [{"name": "add"}]}, r"tool_calls\[0\]: expected"),
        ({"role": "user", "content": "x", "tool_calls": [ADD]}, "only assistant messages make tool calls"),
    ],
)
def test_malformed_tool_calls_name_the_row_and_field(message, error, tiny_model, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, message, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=str(path) + ".*" + error):
        setup(SFTDataModule(tiny_model, str(path), chat_template=TOOL_CHAT_TEMPLATE))
