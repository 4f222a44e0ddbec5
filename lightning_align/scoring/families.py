"""The architecture grid: tiny configs (hidden 64, 2 layers: seconds to build) of the Hugging Face causal-LM
families users bring. The tests prove every fast scoring path equal to each family's own padded forward on them,
so a family listed here is "proven" (`grid_model_types`); adding a family is one line.
"""

from __future__ import annotations

import functools

# Shared by every entry (in each config class's own names where it has them, below).
SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# Shorter than the grid's test rows, so a dropped window shows.
WINDOW = 8

# name: (config class, settings on top of SIZE). Dropout is on wherever the family has it, as in real configs.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, attention_dropout=0.1)),
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "mistral_window": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2_window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, sliding_window_pattern=2),
    ),
    "phi3": ("Phi3Config", dict(resid_pdrop=0.1, embd_pdrop=0.1)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_inner=128)),  # dropout 0.1 by default
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_dropout=0.1, attention_dropout=0.1)),
    "olmo2": ("Olmo2Config", dict()),
    "falcon": ("FalconConfig", dict(num_kv_heads=2, new_decoder_architecture=True)),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64),
    ),
}

# Config classes whose own names differ from SIZE's.
NOT_IN_CONFIG = {"GPT2Config": set(SIZE), "BloomConfig": set(SIZE) - {"hidden_size"}}


def tiny_config(name: str, vocab_size: int, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2):
    import transformers

    class_name, settings = ARCHITECTURES[name]
    size = {k: v for k, v in SIZE.items() if k not in NOT_IN_CONFIG.get(class_name, ())}
    config = getattr(transformers, class_name)(
        **size,
        **settings,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return config


@functools.cache
def grid_model_types() -> frozenset[str]:
    """The model types of the architecture grid, on which the tests prove every fast path of `scoring.plan` equal
    to the model's own padded forward."""
    import transformers

    return frozenset(getattr(transformers, config_class).model_type for config_class, _ in ARCHITECTURES.values())
