"""UnpairedPreferenceDataModule: every row form KTO takes, errors naming file, row and field, and the mismatched
rows that estimate KTO's reference point."""

import pytest

from lightning_align import UnpairedPreferenceDataModule
from lightning_align.data import DataError
from tests.conftest import write_jsonl

CHAT = [{"role": "user", "content": "add: 2+3"}]


def module(tiny_model, tmp_path, rows, **options):
    dm = UnpairedPreferenceDataModule(tiny_model, write_jsonl(tmp_path / "feedback.jsonl", rows), **options)
    dm.setup("fit")
    return dm


def scored_text(dm, example):
    return dm.tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


def test_every_row_form_gives_the_judged_answer_scored_and_its_label(tiny_model, tmp_path):
    rows = [
        {"prompt": "add: 2+3\n", "completion": "5", "label": True},
        {"prompt": CHAT, "completion": [{"role": "assistant", "content": "6"}], "label": False},
        {"messages": [*CHAT, {"role": "assistant", "content": "5"}], "label": True},
        {"prompt": "add: 2+3\n", "chosen": "5", "rejected": "15"},
    ]
    dm = module(tiny_model, tmp_path, rows)
    found = [(scored_text(dm, e), e["desirable"], e["row"]) for e in dm.train_set]
    assert found == [
        ("5</s>", True, 1),
        ("6</s>", False, 2),
        ("5</s>", True, 3),
        ("5</s>", True, 4),
        ("15</s>", False, 4),
    ]


def test_mismatched_rows_pair_each_prompt_with_the_previous_examples_answer_as_trl(tiny_model, tmp_path):
    rows = [{"prompt": f"add: {i}+1\n", "completion": str(i + 1), "label": i % 2 == 0} for i in range(3)]
    dm = module(tiny_model, tmp_path, rows)
    batch = dm.collate(dm.train_set)
    assert batch["input_ids"].shape[0] == 6 and batch["desirable"].tolist() == [True, False, True]
    for i in range(3):  # TRL's KL completions: completions[-1:] + completions[:-1]
        text = dm.tokenizer.decode(batch["input_ids"][3 + i][batch["attention_mask"][3 + i].bool()])
        assert text == f"<s>add: {i}+1\n{(i - 1) % 3 + 1}</s>"
        assert (
            scored_text(
                dm, {"input_ids": batch["input_ids"][3 + i].tolist(), "labels": batch["labels"][3 + i].tolist()}
            )
            == f"{(i - 1) % 3 + 1}</s>"
        )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "completion": "c"}, "field 'label': expected true .* got nothing"),
        ({"prompt": "p", "completion": "c", "label": 1}, "field 'label': expected true .* got 1"),
        ({"messages": CHAT, "label": True}, "the last turn must be the assistant's answer"),
    ],
)
def test_bad_rows_are_refused_by_file_row_and_field(tiny_model, tmp_path, row, message):
    with pytest.raises(DataError, match=rf"feedback.jsonl row 1.*{message}"):
        module(tiny_model, tmp_path, [row])
