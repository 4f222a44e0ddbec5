"""The data layer on real tokenizer kinds: byte-level BPEs trained here with `tokenizers`, with the chat formats of
the major families (Llama 3, ChatML as Qwen uses it, Gemma, Mistral's [INST], Phi-3). Only assistant tokens are
scored, exactly one end of turn per reply, the prompt is a token prefix of prompt + response, BOS never doubled."""

import json

import pytest

from lightning_align import PreferenceDataModule, PromptDataModule, SFTDataModule

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}[INST] {{ (first if loop.first else '') + m['content'] }} "
    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (  # ends a conversation without a generation prompt with EOS, after the last <|end|>
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)

# family: (special tokens, bos, eos, pad, end of turn, template)
FAMILIES = {
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        LLAMA3,
    ),
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
        CHATML,
    ),
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<pad>",
        "<end_of_turn>",
        GEMMA,
    ),
    "mistral": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", "</s>", MISTRAL),
    "phi3": (
        ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        None,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|end|>",
        PHI3,
    ),
}

CORPUS = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(40) for b in range(0, 40, 3)]


def trained_bpe(family: str, root):
    """A byte-level BPE trained on arithmetic text (its merges join digits, across any boundary in a number)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special, bos, eos, pad, _, template = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in special if t not in (bos, eos, pad)],
        chat_template=template,
    )
    path = root / family
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 12 plus 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "And 30 plus 3?"},
    {"role": "assistant", "content": "The answer is 33."},
]


def scored_runs(input_ids, labels):
    """The scored token spans, in order."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_rows_score_each_reply_and_one_end_of_turn(family, tmp_path):
    path, tokenizer = trained_bpe(family, tmp_path)
    _, bos, eos, _, end_of_turn, _ = FAMILIES[family]
    dm = SFTDataModule(path, jsonl(tmp_path / "sft.jsonl", [{"messages": CHAT}] * 2), max_length=512)
    dm.setup("fit")
    example = dm.train_set[0]
    replies = scored_runs(example["input_ids"], example["labels"])
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert [tokenizer.decode(run[:-1]).strip() for run in replies] == ["19", "The answer is 33."]
    assert all(run[-1] == end_id and run.count(end_id) == 1 for run in replies)
    scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    if eos != end_of_turn:
        assert tokenizer.convert_tokens_to_ids(eos) not in scored  # no EOS after the template's end of turn
    if bos is not None:
        bos_id = tokenizer.convert_tokens_to_ids(bos)
        assert example["input_ids"][0] == bos_id and example["input_ids"].count(bos_id) == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_generation_prompt_is_a_token_prefix_of_each_preference_side(family, tmp_path):
    path, tokenizer = trained_bpe(family, tmp_path)
    prompt = CHAT[:4]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "33"}],
        "rejected": [{"role": "assistant", "content": "36"}],
    }
    preferences = PreferenceDataModule(path, jsonl(tmp_path / "pref.jsonl", [row] * 2), max_length=512)
    prompts = PromptDataModule(path, jsonl(tmp_path / "prompts.jsonl", [{"messages": prompt}] * 2), max_length=512)
    preferences.setup("fit")
    prompts.setup("fit")
    prompt_ids = prompts.train_set[0]["input_ids"]
    for side in ("chosen", "rejected"):
        ids, labels = preferences.train_set[0][side]["input_ids"], preferences.train_set[0][side]["labels"]
        first_scored = next(i for i, label in enumerate(labels) if label != -100)
        assert ids[:first_scored] == prompt_ids  # what PPO samples from is exactly what DPO conditions on
        bos = FAMILIES[family][1]
        if bos is not None:
            assert ids.count(tokenizer.convert_tokens_to_ids(bos)) == 1


def test_plain_rows_keep_the_prompt_a_prefix_where_bpe_merges_across_the_boundary(tmp_path):
    path, tokenizer = trained_bpe("llama3", tmp_path)
    prompt, completion = "What is 12 plus 7? The answer is 1", "9."
    whole = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    apart = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert whole[: len(apart)] != apart  # the trained merges do cross this boundary
    dm = SFTDataModule(path, jsonl(tmp_path / "plain.jsonl", [{"prompt": prompt, "completion": completion}] * 2))
    dm.setup("fit")
    ids, labels = dm.train_set[0]["input_ids"], dm.train_set[0]["labels"]
    first_scored = next(i for i, label in enumerate(labels) if label != -100)
    assert ids[:first_scored] == apart  # no BOS: this tokenizer does not add one to plain text
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != -100]) == "9.<|eot_id|>"
