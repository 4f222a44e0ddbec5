"""Preference rows: shared prompt, response-only scoring, truncation and the errors."""

import pytest

from lightning_align import DataError, PreferenceDataModule
from tests.conftest import write_jsonl

IGNORE = -100


def setup(tiny_model, data, **kwargs):
    dm = PreferenceDataModule(tiny_model, data, **kwargs)
    dm.setup("fit")
    return dm


def scored_text(tokenizer, side):
    return tokenizer.decode([t for t, lab in zip(side["input_ids"], side["labels"]) if lab != IGNORE])


def test_plain_pair_shares_the_prompt_and_scores_each_response_with_one_eos(tiny_model, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "sort: 312\n", "chosen": "123", "rejected": "132"}])
    example = setup(tiny_model, path).train_set[0]
    prompt = [tokenizer.bos_token_id] + tokenizer("sort: 312\n", add_special_tokens=False).input_ids
    for side, text in (("chosen", "123"), ("rejected", "132")):
        assert example[side]["input_ids"][: len(prompt)] == prompt
        assert example[side]["labels"][: len(prompt)] == [IGNORE] * len(prompt)
        assert scored_text(tokenizer, example[side]) == text + "</s>"


def test_chat_pair_scores_only_the_final_assistant_reply(tiny_model, tokenizer, tmp_path):
    prompt = [
        {"role": "user", "content": "sort: 21"},
        {"role": "assistant", "content": "12"},
        {"role": "user", "content": "reverse: ab"},
    ]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "ba"}],
        "rejected": [{"role": "assistant", "content": "ab"}],
    }
    example = setup(tiny_model, write_jsonl(tmp_path / "c.jsonl", [row])).train_set[0]
    assert scored_text(tokenizer, example["chosen"]) == "ba</s>"
    assert scored_text(tokenizer, example["rejected"]) == "ab</s>"
    rendered = tokenizer.apply_chat_template(prompt + row["chosen"], tokenize=False)
    assert tokenizer.decode(example["chosen"]["input_ids"]) == rendered
    assert example["chosen"]["input_ids"].count(tokenizer.bos_token_id) == 1


def test_batch_stacks_chosen_then_rejected_and_carries_margins(tiny_model, tmp_path):
    rows = [{"prompt": f"add: {i}+1\n", "chosen": str(i + 1), "rejected": str(i), "margin": i} for i in range(3)]
    dm = setup(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), batch_size=3)
    batch = dm.collate(dm.train_set)
    assert batch["input_ids"].shape[0] == 6 and batch["margin"].tolist() == [0.0, 1.0, 2.0]
    for i, example in enumerate(dm.train_set):
        n = len(example["chosen"]["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == example["chosen"]["input_ids"]
        m = len(example["rejected"]["input_ids"])
        assert batch["input_ids"][3 + i, :m].tolist() == example["rejected"]["input_ids"]


def test_truncation_drops_the_same_prompt_tokens_from_both_sides_then_refuses_when_off(tiny_model, tmp_path):
    row = {"prompt": "reverse: abcdefgh\n", "chosen": "hgfedcba", "rejected": "hgfedcab"}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    example = setup(tiny_model, path, max_length=12).train_set[0]
    assert len(example["chosen"]["input_ids"]) == len(example["rejected"]["input_ids"]) == 12
    assert example["chosen"]["input_ids"][:3] == example["rejected"]["input_ids"][:3]
    with pytest.raises(DataError, match=f"{path} row 1: 28 tokens, longer than max_length=12"):
        setup(tiny_model, path, max_length=12, truncation="error")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "chosen": "b"}, "row 2: missing field 'rejected'"),
        ({"prompt": "a", "chosen": "", "rejected": "c"}, "row 2, field 'chosen': is empty"),
        ({"prompt": "a", "chosen": "b", "rejected": 5}, "row 2, field 'rejected': expected a string, got int"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "row 2, field 'rejected': identical to 'chosen'"),
        ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}, "row 2, field 'margin': expected a number"),
    ],
)
def test_bad_preference_rows_name_file_row_and_field(tiny_model, tmp_path, row, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}, row])
    with pytest.raises(DataError, match=f"{path} {message}"):
        setup(tiny_model, path)


def test_identical_pairs_can_be_dropped_and_are_counted(tiny_model, tmp_path, caplog):
    rows = [{"prompt": "x", "chosen": "y", "rejected": "z"}, {"prompt": "x", "chosen": "y", "rejected": "y"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level("INFO"):
        dm = setup(tiny_model, path, drop_identical=True)
    assert [e["row"] for e in dm.train_set] == [1]
    assert "2 rows: 1 kept (0 truncated), 1 dropped; 1 chosen and rejected are identical" in caplog.text
