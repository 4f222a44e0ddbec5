"""A tiny Llama-style causal LM and a character-level tokenizer with a chat template, built locally.

Built once into a cache folder and then loaded like any hub model with `AutoModelForCausalLM.from_pretrained`.
Weights come from a fixed seed, so every machine builds the same model.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

# Bump when the tokenizer or model config changes, so old caches are not reused.
TINY_MODEL_VERSION = "v3"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"

# Assistant turns end with EOS; the template adds BOS itself, so callers must not add it again. With tools, their
# signatures go in a system line (`tools: add(a, b)`: a tiny model has few positions for a JSON schema), each call
# as JSON between <tool_call> markers, results in <|tool|> turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools:{% for tool in tools %} {{ tool['function']['name'] }}("
    "{{ (tool['function']['parameters']['properties'] or {}) | join(', ') }}){% endfor %}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}{{ eos_token }}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOL_CHAT_TEMPLATE = CHAT_TEMPLATE  # the tiny model's own template renders tool calls


def cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_ALIGN_HOME", Path.home() / ".cache" / "lightning_align"))


def build_tokenizer():
    """Character-level tokenizer (a BPE without merges), BOS added by the post-processor like Llama's."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 128, num_layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def tiny_model_path(root: str | Path | None = None) -> Path:
    """Folder of the tiny model and its tokenizer, built on first use (atomically, so a crash leaves no half)."""
    path = Path(root) if root is not None else cache_dir() / f"tiny-llama-{TINY_MODEL_VERSION}"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    try:
        tokenizer = build_tokenizer()
        model = build_model(len(tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(path)
        except OSError:  # another process finished first: keep theirs
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
