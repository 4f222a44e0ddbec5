"""The first hour, round 3: inputs that went on silently or stopped with errors a user could not act on now give a
clear error (file, row, field and the fix) or a visible warning."""

import json
import warnings

import pytest

from lightning_align import (
    DataError,
    KTOModule,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    SFTModule,
    UnpairedPreferenceDataModule,
)
from tests.conftest import trainer, write_jsonl

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)


# Renders each message's content only, so an assistant's tool calls are lost.
WITHOUT_TOOL_CALLS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def setup(dm):
    dm.setup("fit")
    return dm


def test_responses_that_repeat_the_prompts_turns_are_refused_naming_the_field(tiny_model, tmp_path):
    prompt = [user("add: 1+2")]
    rows = [{"prompt": prompt, "chosen": [user("add: 1+2"), assistant("3")], "rejected": [assistant("4")]}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs.jsonl row 1, field 'chosen'.*repeating the prompt's turns"):
        setup(PreferenceDataModule(tiny_model, str(path), chat_template=CHAT))
    unpaired = [{"prompt": prompt, "completion": [user("add: 1+2"), assistant("3")], "label": True}] * 2
    path = write_jsonl(tmp_path / "kto.jsonl", unpaired)
    with pytest.raises(DataError, match=r"kto.jsonl row 1, field 'completion'.*repeating the prompt's turns"):
        setup(UnpairedPreferenceDataModule(tiny_model, str(path), chat_template=CHAT))


def test_a_conversational_prompt_with_plain_responses_blames_the_responses(tiny_model, tmp_path):
    rows = [{"prompt": [user("add: 1+2")], "chosen": "3", "rejected": "4"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1, field 'chosen': a str, but 'prompt' is a list of messages"):
        setup(PreferenceDataModule(tiny_model, str(path), chat_template=CHAT))


def test_a_kto_label_written_as_a_string_says_a_json_boolean_is_needed(tiny_model, tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": "true"}, {"prompt": "a", "completion": "c", "label": False}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1, field 'label'.*the string 'true'; write the JSON boolean true"):
        setup(UnpairedPreferenceDataModule(tiny_model, str(path)))


def test_tool_calls_a_template_does_not_render_are_refused_with_what_to_do(tiny_model, tmp_path):
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "add"}}]}
    rows = [{"messages": [user("add: 1+2"), call, {"role": "tool", "content": "3"}, assistant("3")]}]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    with pytest.raises(DataError, match=r"messages\[1\]': the chat template does not render this message's tool"):
        setup(SFTDataModule(tiny_model, str(path), chat_template=WITHOUT_TOOL_CALLS))


def test_a_json_file_holding_json_lines_is_read_as_json_lines(tiny_model, tmp_path):
    path = tmp_path / "data.json"  # what Dataset.to_json("data.json") writes by default
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(3)))
    assert len(setup(SFTDataModule(tiny_model, str(path))).train_set) == 3


def test_a_datasetdicts_test_split_validates_when_no_val_data_is_given(tiny_model, tmp_path, caplog):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])}
    ).save_to_disk(str(folder))
    with caplog.at_level("INFO"):
        dm = setup(SFTDataModule(tiny_model, str(folder)))
    assert len(dm.train_set) == 4 and len(dm.val_set) == 2
    assert "validating on its 'test' split (2 rows)" in caplog.text
    given = setup(SFTDataModule(tiny_model, str(folder), val_data=str(write_jsonl(tmp_path / "v.jsonl", rows[:1]))))
    assert len(given.val_set) == 1


def test_text_the_tokenizer_cannot_represent_is_counted_and_warned_about(tiny_model, tmp_path):
    rows = [{"prompt": "translate:", "completion": "مرحبا بالعالم 😀"}, {"prompt": "add: 1+2", "completion": "3"}]
    path = write_jsonl(tmp_path / "unk.jsonl", rows)
    with pytest.warns(UserWarning, match=r"unk.jsonl: \d+ of \d+ scored tokens .* unknown token '<unk>'"):
        setup(SFTDataModule(tiny_model, str(path)))
    clean = write_jsonl(tmp_path / "clean.jsonl", rows[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup(SFTDataModule(tiny_model, str(clean)))


def test_warmup_longer_than_the_run_is_warned_about(tiny_model, plain_task_files, tmp_path):
    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=4, max_length=32)
    with pytest.warns(UserWarning, match=r"warmup_steps=100 is not shorter than the run \(3 optimiser steps\).*3%"):
        trainer(tmp_path, max_steps=3).fit(SFTModule(tiny_model, warmup_steps=100), datamodule=dm)


def test_kto_given_pairs_is_refused_before_the_model_loads(tiny_model, task_files, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(KTOModule, "configure_model", lambda self: loaded.append(True))
    dm = PreferenceDataModule(tiny_model, task_files["preference_train"], batch_size=4, max_length=48)
    with pytest.raises(ValueError, match="KTOModule trains on answers marked .* use a UnpairedPreferenceDataModule"):
        trainer(tmp_path, max_steps=1).fit(KTOModule(tiny_model), datamodule=dm)
    assert not loaded


def test_rows_longer_than_the_models_positions_are_refused_with_a_count(tiny_model, tmp_path):
    from lightning_align import GRPOModule
    from lightning_align.demos import task_reward

    long_prompt = "sort: " + " ".join("123" for _ in range(130))  # about 400 tokens; the model has 256 positions
    rows = [{"prompt": long_prompt}, {"prompt": "sort: 321"}]
    dm = PromptDataModule(tiny_model, str(write_jsonl(tmp_path / "p.jsonl", rows)), max_length=1024)
    module = GRPOModule(tiny_model, rewards=task_reward, num_generations=2, max_new_tokens=8)
    too_long = r"1 of 2 train rows are longer than the 248 tokens .* max_length to at most 248"
    with pytest.raises(ValueError, match=too_long):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)
    sft_rows = write_jsonl(tmp_path / "s.jsonl", [{**rows[0], "completion": "1"}])
    sft = SFTDataModule(tiny_model, str(sft_rows), max_length=1024)
    with pytest.raises(ValueError, match=r"1 of 1 train rows are longer than the 256 tokens"):
        trainer(tmp_path, max_steps=1).fit(SFTModule(tiny_model), datamodule=sft)


def test_online_rl_with_gradient_accumulation_names_what_to_use_instead(tiny_model, task_files, tmp_path):
    from lightning_align import PPOModule
    from lightning_align.demos import task_reward

    dm = PromptDataModule(tiny_model, task_files["prompts_train"], batch_size=4, apply_chat_template=False)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 cannot apply; .* minibatch_size"):
        trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(PPOModule(tiny_model, reward=task_reward), dm)


def test_validate_without_validation_data_is_an_error(tiny_model, plain_task_files, tmp_path):
    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=4, max_length=32)
    with pytest.raises(DataError, match="no validation data, so validate would measure nothing"):
        trainer(tmp_path).validate(SFTModule(tiny_model), datamodule=dm)
