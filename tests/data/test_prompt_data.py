"""PromptDataModule: what the policy samples from is what it was trained on, and a chat row's answer is never
inside its prompt."""

import logging

import pytest

from lightning_align import PromptDataModule
from lightning_align.data import DataError
from tests.conftest import write_jsonl

CHAT = [{"role": "user", "content": "add: 2+3"}]


def first_example(tiny_model, tmp_path, rows, **options):
    dm = PromptDataModule(tiny_model, write_jsonl(tmp_path / "prompts.jsonl", rows), **options)
    dm.setup("fit")
    return dm, dm.train_set[0]


def test_plain_prompts_are_rendered_with_the_chat_template_unless_switched_off(tiny_model, tmp_path):
    dm, templated = first_example(tiny_model, tmp_path, [{"prompt": "add: 2+3"}])
    rendered = dm.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert dm.tokenizer.decode(templated["input_ids"]) == rendered
    assert templated["prompt"] == "add: 2+3"  # rewards see the prompt as written
    dm, plain = first_example(tiny_model, tmp_path, [{"prompt": "add: 2+3"}], apply_chat_template=False)
    assert dm.tokenizer.decode(plain["input_ids"]) == "<s>add: 2+3"


def test_the_same_prompt_as_text_messages_or_trl_conversational_rows_is_the_same_tokens(tiny_model, tmp_path):
    rows = [{"prompt": "add: 2+3"}, {"messages": CHAT}, {"prompt": CHAT}]
    dm = PromptDataModule(tiny_model, write_jsonl(tmp_path / "prompts.jsonl", rows))
    dm.setup("fit")
    assert dm.train_set[0]["input_ids"] == dm.train_set[1]["input_ids"] == dm.train_set[2]["input_ids"]


def test_a_final_assistant_turn_is_cut_from_the_prompt_and_kept_as_the_answer(tiny_model, tmp_path, caplog):
    rows = [{"messages": [*CHAT, {"role": "assistant", "content": "5"}], "source": "gsm"}, {"messages": CHAT}]
    with caplog.at_level(logging.INFO):
        dm, example = first_example(tiny_model, tmp_path, rows)
    assert "5" not in dm.tokenizer.decode(example["input_ids"])
    assert dm.tokenizer.decode(example["input_ids"]).endswith("<|assistant|>")
    batch = dm.collate(dm.train_set)
    assert batch["fields"] == {"answer": ["5", None], "source": ["gsm", None]}
    assert "1 assistant turns cut from the prompt (kept as 'answer')" in caplog.text


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [*CHAT, {"role": "assistant", "content": "5"}], "answer": "5"}, "has that field already"),
        ({"messages": [{"role": "assistant", "content": "5"}]}, "only an assistant turn"),
        ({"messages": CHAT, "prompt": "add: 2+3"}, "has both 'messages' and 'prompt'"),
    ],
)
def test_rows_that_cannot_be_prompts_are_refused_by_file_and_row(tiny_model, tmp_path, row, message):
    with pytest.raises(DataError, match=rf"prompts.jsonl row 1.*{message}"):
        first_example(tiny_model, tmp_path, [row])
