"""What used to train the wrong thing with no word: truncation that made bad examples, rows accepted silently,
mismatched data and modules, and a checkpoint of another method resumed as this one."""

import logging

import pytest
import torch

from lightning_align import DataError, DPOModule, PreferenceDataModule, RewardModule, SFTDataModule, SFTModule
from tests.conftest import trainer, write_jsonl

PROMPT = "reverse: abcdefghijklmnop\n"  # 1 BOS + 26 characters: 27 prompt tokens


def preference_module(model, path, **kwargs):
    dm = PreferenceDataModule(model, str(path), **kwargs)
    dm.setup("fit")
    return dm


def test_truncation_keeps_a_quarter_of_max_length_of_prompt_and_whole_responses(tiny_model, tokenizer, tmp_path):
    rows = [
        {"prompt": PROMPT, "completion": "ponm"},  # fits once the prompt is cut to the room left
        {"prompt": PROMPT, "completion": "ponmlkjihgfedcba"},  # 17 tokens: beside 5 prompt tokens, too long
        {"prompt": "hi\n", "completion": "ab"},  # fits as it is
    ]
    dm = SFTDataModule(tiny_model, str(write_jsonl(tmp_path / "t.jsonl", rows)), max_length=20)
    dm.setup("fit")
    assert len(dm.train_set) == 2
    cut = dm.train_set[0]
    prompt_kept = sum(label == -100 for label in cut["labels"])
    assert len(cut["input_ids"]) <= 20 and prompt_kept >= 20 // 4
    assert cut["input_ids"][-1] == tokenizer.eos_token_id and cut["labels"][-1] == tokenizer.eos_token_id


def test_one_summary_line_counts_kept_truncated_and_dropped_rows(tiny_model, tmp_path, caplog):
    rows = [{"prompt": PROMPT, "completion": "ponm"}, {"prompt": PROMPT, "completion": "ponmlkjihgfedcba"}]
    rows += [{"prompt": "hi\n", "completion": "ab"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level(logging.INFO):
        SFTDataModule(tiny_model, str(path), max_length=20).setup("fit")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(str(path)))
    assert line == (
        f"{path}: 3 rows: 2 kept (1 truncated), 1 dropped; 1 response does not fit max_length=20 beside the kept prompt"
    )


def test_a_pair_that_truncation_would_make_identical_is_dropped_not_trained(tiny_model, tmp_path):
    # The responses differ only in their last characters: cutting the responses' ends made them one.
    row = {"prompt": PROMPT, "chosen": "ponmlkjihgfedcba", "rejected": "ponmlkjihgfedcab"}
    path = write_jsonl(tmp_path / "p.jsonl", [row, {"prompt": "hi\n", "chosen": "ab", "rejected": "ba"}])
    dm = preference_module(tiny_model, path, max_length=16)
    assert [e["row"] for e in dm.train_set] == [2]
    for example in dm.train_set:
        assert example["chosen"]["input_ids"] != example["rejected"]["input_ids"]


def test_whitespace_only_differences_are_counted_in_one_warning(tiny_model, tmp_path):
    rows = [{"prompt": "q\n", "chosen": "a b", "rejected": "a  b"}] * 3 + [
        {"prompt": "q\n", "chosen": "a", "rejected": "b"}
    ]
    with pytest.warns(UserWarning, match="3 pairs whose chosen and rejected differ only in whitespace"):
        preference_module(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows), max_length=32)


def test_an_empty_validation_file_is_refused(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q\n", "completion": "a"}])
    empty = tmp_path / "val.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{empty}: no rows \\(val_data\\)"):
        SFTDataModule(tiny_model, str(train), val_data=str(empty)).setup("fit")


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 1
                + [{"role": "user", "content": "and?"}]
            },
            "row 1, field 'messages\\[2\\]': the conversation ends with a user turn, which trains nothing",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt": "q"},
            "row 1: has both 'messages' and 'prompt'",
        ),
    ],
)
def test_chat_rows_that_would_lose_a_part_silently_are_refused(tiny_model, tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        SFTDataModule(tiny_model, str(write_jsonl(tmp_path / "c.jsonl", [row]))).setup("fit")


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_non_positive_beta_is_refused(beta):
    with pytest.raises(ValueError, match=f"beta must be positive, got {beta}"):
        DPOModule("any", beta=beta)


@pytest.mark.parametrize("module_class", [DPOModule, RewardModule])
def test_preference_modules_refuse_sft_batches_at_the_first_batch(tiny_model, task_files, tmp_path, module_class):
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=4, max_length=48)
    with pytest.raises(ValueError, match=f"{module_class.__name__} trains on preference pairs .*PreferenceDataModule"):
        trainer(tmp_path, max_steps=1).fit(module_class(tiny_model), datamodule=dm)


def test_sft_refuses_preference_batches(tiny_model, task_files, tmp_path):
    dm = PreferenceDataModule(tiny_model, task_files["preference_train"], batch_size=4, max_length=48)
    refused = "SFTModule trains on token sequences with labels, but PreferenceDataModule gives pref"
    with pytest.raises(ValueError, match=refused):
        trainer(tmp_path, max_steps=1).fit(SFTModule(tiny_model), datamodule=dm)


def test_a_checkpoint_of_another_method_is_refused_not_resumed(tiny_model, task_files, tmp_path):
    sft = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=4, max_length=48)
    first = trainer(tmp_path / "sft", max_steps=1, enable_checkpointing=True)
    first.fit(SFTModule(tiny_model), datamodule=sft)
    checkpoint = next((tmp_path / "sft").rglob("*.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["lightning_align"]["module"] == "SFTModule"
    pairs = PreferenceDataModule(tiny_model, task_files["preference_train"], batch_size=4, max_length=48)
    with pytest.raises(ValueError, match="the checkpoint is of another run: module 'SFTModule' \\(this run: 'DPOM"):
        trainer(tmp_path / "dpo", max_steps=2).fit(DPOModule(tiny_model), datamodule=pairs, ckpt_path=checkpoint)


def test_a_crash_while_exporting_leaves_the_previous_export_readable(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    module = SFTModule(tiny_model)
    module.configure_model()
    export = module.save_pretrained(tmp_path / "export")
    good = (export / "model.safetensors").read_bytes()

    def crash_half_way(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"truncated")
        raise OSError("disk full")

    monkeypatch.setattr(type(module.model), "save_pretrained", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        module.save_pretrained(export, overwrite=True)
    assert (export / "model.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no half-written folder left beside it
    AutoModelForCausalLM.from_pretrained(export)


def test_adapter_config_names_the_base_model_as_the_user_gave_it(tiny_model, tmp_path):
    import json

    from lightning_align import LoRA
    from lightning_align.demos.assets import DEMO_MODEL
    from tests.conftest import ready

    module = ready(SFTModule(DEMO_MODEL), [LoRA(r=4)], tmp_path)
    folder = module.save_pretrained(tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == DEMO_MODEL


def test_shuffle_false_trains_in_the_files_order(tiny_model, task_files):
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=4, max_length=48, shuffle=False)
    dm.setup("fit")
    rows = [row for batch in list(dm.train_dataloader())[:3] for row in batch["input_ids"].tolist()]
    expected = [e["input_ids"] for e in dm.train_set[:12]]
    assert [[t for t in row if t != dm.tokenizer.pad_token_id] for row in rows] == expected
    shuffled = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=4, max_length=48)
    shuffled.setup("fit")
    assert (
        next(iter(shuffled.train_dataloader()))["input_ids"].tolist()
        != next(iter(dm.train_dataloader()))["input_ids"].tolist()
    )


def test_a_utf8_byte_order_mark_is_read_not_refused(tiny_model, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + b'{"prompt": "q\\n", "completion": "a"}\n{"prompt": "r\\n", "completion": "b"}\n'
    )
    dm = SFTDataModule(tiny_model, str(path))
    dm.setup("fit")
    assert len(dm.train_set) == 2


def test_a_chat_opening_with_an_assistant_turn_names_the_row(tiny_model, tmp_path):
    row = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"}] * 1}
    row["messages"].append({"role": "assistant", "content": "a"})
    with pytest.raises(DataError, match="row 1, field 'messages\\[0\\]': the conversation starts with an assistant"):
        SFTDataModule(tiny_model, str(write_jsonl(tmp_path / "c.jsonl", [row]))).setup("fit")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda model: SFTModule(model, learning_rate=-1e-5), "learning_rate must not be negative, got -1e-05"),
        (lambda model: SFTDataModule(model, "x.jsonl", batch_size=0), "batch_size must be at least 1 and max_length"),
    ],
)
def test_bad_numbers_are_refused_naming_the_option(tiny_model, build, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_model)


def test_an_unknown_model_name_fails_in_seconds_saying_why(tmp_path):
    import time

    from lightning_align.data.base import load_tokenizer

    started = time.perf_counter()
    with pytest.raises(DataError, match="'no-org/no-such-model' could not be loaded: there is no such folder here"):
        load_tokenizer("no-org/no-such-model")
    assert time.perf_counter() - started < 20  # transformers' own retries took about 50 s offline
