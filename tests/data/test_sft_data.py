"""Tokenisation, masking, truncation, packing and the errors of the SFT data layer."""

import json

import pytest
import torch

from lightning_align.data import DataError, SFTDataModule
from lightning_align.data.sources import Row
from tests.conftest import write_jsonl

IGNORE = -100


def datamodule(tiny_model, data, **kwargs):
    dm = SFTDataModule(tiny_model, data, **kwargs)
    dm.setup("fit")
    return dm


def test_plain_row_scores_completion_and_one_eos_after_a_single_bos(tiny_model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "sort: 321\n", "completion": "123"}])
    example = datamodule(tiny_model, data).train_set[0]
    prompt_ids = tokenizer("sort: 321\n", add_special_tokens=False).input_ids
    completion_ids = tokenizer("123", add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert example["input_ids"] == [bos] + prompt_ids + completion_ids + [eos]
    assert example["labels"] == [IGNORE] * (1 + len(prompt_ids)) + completion_ids + [eos]


def test_chat_row_scores_only_assistant_replies_and_never_doubles_bos_or_eos(tiny_model, tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "sort: 21"},
        {"role": "assistant", "content": "12"},
        {"role": "user", "content": "reverse: ab"},
        {"role": "assistant", "content": "ba"},
    ]
    example = datamodule(tiny_model, write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])).train_set[0]
    ids, labels = example["input_ids"], example["labels"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == rendered  # the template adds BOS itself: exactly one
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.eos_token_id) == 2  # one per assistant turn, from the template
    scored = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert scored == "12</s>ba</s>"


def test_train_on_prompt_scores_every_token_but_the_first(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "add: 1+1\n", "completion": "2"}])
    example = datamodule(tiny_model, data, train_on_prompt=True).train_set[0]
    assert example["labels"] == example["input_ids"]


def test_left_truncation_drops_prompt_tokens_and_never_cuts_the_response(tiny_model, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "reverse: abcdefgh\n", "completion": "hgfedcba"}])
    example = datamodule(tiny_model, data, max_length=12).train_set[0]
    assert len(example["input_ids"]) == 12
    assert tokenizer.decode(example["input_ids"]) == "gh\nhgfedcba</s>"
    with pytest.raises(DataError, match="all 1 rows were dropped .*response does not fit max_length=5"):
        datamodule(tiny_model, data, max_length=5)  # no prompt left beside the response: the row is dropped


def test_packed_batch_gives_the_same_logits_as_separate_rows(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": "sort: 4213\n", "completion": "1234"}, {"prompt": "add: 3+4\n", "completion": "7"}]
    dm = datamodule(tiny_model, write_jsonl(tmp_path / "a.jsonl", rows), packing=True)
    packed = dm.collate(dm.train_set)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        start = 0
        for example in dm.train_set:
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits
            torch.testing.assert_close(logits[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
    first_of_second = len(dm.train_set[0]["input_ids"])
    assert packed["labels"][0, first_of_second] == IGNORE


def test_padded_batch_follows_hugging_face_conventions(tiny_model, tokenizer, task_files):
    dm = datamodule(tiny_model, task_files["sft_train"], batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    padding = batch["attention_mask"] == 0
    assert (batch["labels"][padding] == IGNORE).all()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()


def test_sources_jsonl_json_parquet_datasets_folder_and_in_memory_give_the_same_rows(tiny_model, tmp_path):
    import datasets

    rows = [{"prompt": f"add: {i}+1\n", "completion": str(i + 1)} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    sources = [write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "a.json", tmp_path / "a.parquet"]
    sources += [tmp_path / "folder", ds]
    encoded = [datamodule(tiny_model, source).train_set for source in sources]
    assert all(e == encoded[0] for e in encoded) and len(encoded[0]) == 5


def test_val_fraction_holds_out_rows_disjoint_from_train(tiny_model, task_files):
    dm = datamodule(tiny_model, task_files["sft_train"], val_fraction=0.1)
    assert len(dm.val_set) == 200 and len(dm.train_set) == 1800
    train_rows = {e["row"] for e in dm.train_set}
    assert not any(e["row"] in train_rows for e in dm.val_set)
    assert len(train_rows | {e["row"] for e in dm.val_set}) == 2000


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "a"}, "row 2: missing field 'completion'"),
        ({"prompt": "a", "completion": 3}, "row 2, field 'completion': expected a string, got int"),
        ({"prompt": "a", "completion": "  "}, "row 2, field 'completion': is empty"),
        ({"text": "a"}, "row 2: expected 'prompt' and 'completion' fields, or 'messages'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "row 2, field 'messages[0]': unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "row 2: the conversation has no assistant message"),
        ({"messages": "hi"}, "row 2, field 'messages': expected a non-empty list"),
        ([1, 2], "row 2: expected an object with named fields, got list"),
    ],
)
def test_bad_rows_name_file_row_and_field(tiny_model, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok\n", "completion": "fine"}, line])
    with pytest.raises(DataError, match=str(path) + " " + message.replace("[", r"\[").replace("]", r"\]")):
        datamodule(tiny_model, path)


def test_malformed_json_and_non_utf8_lines_are_named(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=f"{path} row 3: malformed JSON"):
        datamodule(tiny_model, path)
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n')
    with pytest.raises(DataError, match=f"{path} row 2: not valid UTF-8"):
        datamodule(tiny_model, path)


def test_row_longer_than_max_length_is_refused_when_truncation_is_off(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x" * 30, "completion": "y"}])
    with pytest.raises(DataError, match=f"{path} row 1: 33 tokens, longer than max_length=16"):
        datamodule(tiny_model, path, max_length=16, truncation="error")


def test_missing_file_and_unknown_format_are_clear(tiny_model, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        datamodule(tiny_model, tmp_path / "nope.jsonl")
    (tmp_path / "a.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        datamodule(tiny_model, tmp_path / "a.csv")


def plain_tokenizer_folder(tokenizer, tmp_path, **changes):
    import copy

    tok = copy.deepcopy(tokenizer)
    for name, value in changes.items():
        setattr(tok, name, value)
    tok.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_chat_rows_with_a_tokenizer_without_template_say_what_to_do(tokenizer, tmp_path):
    folder = plain_tokenizer_folder(tokenizer, tmp_path, chat_template=None)
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError, match="has no chat template.*pass chat_template="):
        datamodule(folder, write_jsonl(tmp_path / "c.jsonl", rows))
    dm = datamodule(folder, tmp_path / "c.jsonl", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert dm.train_set[0]["labels"][-2:] == dm.train_set[0]["input_ids"][-2:]


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer, tmp_path):
    folder = plain_tokenizer_folder(tokenizer, tmp_path, pad_token=None)
    dm = datamodule(folder, write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}]))
    assert dm.tokenizer.pad_token_id == tokenizer.eos_token_id


def test_row_helper_names_place():
    assert Row("f.jsonl", 4, {}).where("chosen") == "f.jsonl row 4, field 'chosen'"


def merging_tokenizer(folder):
    """The demo tokenizer plus one BPE merge, "1" + "2" -> "12", so text can merge across a prompt boundary."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    from lightning_align.demos.tiny import CHARACTERS, CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS) + ["12"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2")], unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_prompt_is_a_true_token_prefix_when_bpe_merges_across_the_boundary(tmp_path):
    tokenizer = merging_tokenizer(tmp_path / "tok")
    prompt, completion = "sort: 321\nx1", "23"
    joint = tokenizer(prompt + completion, add_special_tokens=False).input_ids
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert joint[: len(prompt_ids)] != prompt_ids  # "1" + "2" merged across the boundary: the trap is real here
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": prompt, "completion": completion}])
    example = datamodule(str(tmp_path / "tok"), data).train_set[0]
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    assert example["input_ids"] == [tokenizer.bos_token_id] + prompt_ids + completion_ids + [tokenizer.eos_token_id]
    scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert scored == completion_ids + [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "template, message",
    [
        (  # drops the assistant turns: nothing would be learned
            "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}"
            "{% endfor %}",
            "no token is scored, so this row would train on nothing; the rendered text, scored parts in [[...]]: "
            "'<s>sort: 21\\n'",
        ),
        (  # drops the user turns: the whole text would be learned as if it were the answer
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
            "{% endif %}{% endfor %}",
            "every token is scored, the prompt too",
        ),
    ],
    ids=["all-unscored", "all-scored"],
)
def test_a_template_that_scores_nothing_or_everything_stops_with_the_marked_text(
    tiny_model, tmp_path, template, message
):
    messages = [{"role": "user", "content": "sort: 21"}, {"role": "assistant", "content": "12"}]
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match="c.jsonl row 1") as raised:
        datamodule(tiny_model, data, chat_template=template)
    assert message in str(raised.value)
    if "every token" in message:
        assert "[[12</s>]]" in str(raised.value)


def test_pack_padded_keeps_every_token_and_position_and_finds_each_last_token():
    from lightning_align.scoring.packing import pack_padded

    lengths = [7, 3, 5, 2, 7, 1]
    ids = torch.zeros(len(lengths), 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(n) + 100 * (i + 1)  # each token names its example and position
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids + 1, -100)
    packed = pack_padded(ids, mask, labels, fill=0)
    flat_ids, flat_pos = packed["input_ids"].flatten(), packed["position_ids"].flatten()
    assert packed["input_ids"].shape == (4, 7)  # first fit decreasing: 7 | 7 | 5+2 | 3+1
    for i, n in enumerate(lengths):
        end = int(packed["last"][i])
        torch.testing.assert_close(flat_ids[end - n + 1 : end + 1], ids[i, :n])
        torch.testing.assert_close(flat_pos[end - n + 1 : end + 1], torch.arange(n))
        assert (packed["example"].flatten()[end - n + 1 : end + 1] == i).all()
        # labels travel with their tokens, except the first, which no position of the example predicts
        torch.testing.assert_close(
            packed["labels"].flatten()[end - n + 1 : end + 1], torch.cat([torch.tensor([-100]), labels[i, 1:n]])
        )
    assert sorted(flat_ids[flat_ids != 0].tolist()) == sorted(ids[mask.bool()].tolist())
    for row_ids, row_pos in zip(packed["input_ids"], packed["position_ids"]):  # a tail restarts at position 0
        used = int((row_ids != 0).sum())
        torch.testing.assert_close(row_pos[used:], torch.arange(7 - used))
    assert (packed["labels"].flatten()[flat_ids == 0] == -100).all() and (
        packed["example"].flatten()[flat_ids == 0] == -1
    ).all()


def test_pack_padded_into_one_row_keeps_every_example_in_order_of_length():
    from lightning_align.scoring.packing import pack_padded

    lengths = [3, 5, 1]
    ids = torch.zeros(3, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(n) + 10 * (i + 1)
    packed = pack_padded(ids, (ids != 0).long(), one_row=True)
    assert packed["input_ids"].tolist() == [[20, 21, 22, 23, 24, 10, 11, 12, 30]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0]]
    assert packed["last"].tolist() == [7, 4, 8]
