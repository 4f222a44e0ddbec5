"""Tiny random-weight models of the Hugging Face causal-LM families users bring, built from their config classes
(hidden 64, 2 layers: seconds). The architecture grid of the tests and the README's table of scoring paths are
made from `ARCHITECTURES`: adding a family is one line here.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def tiny_model_folder(name: str, root: str | Path, seed: int = 0) -> Path:
    """A folder with a tiny random model of architecture `name` and the demo tokenizer, as `from_pretrained` loads."""
    from transformers import AutoModelForCausalLM

    from lightning_align.demos.tiny import build_tokenizer

    path = Path(root) / name
    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer()
    config = tiny_config(name, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def scoring_table() -> str:
    """The README's table: for each family of the grid, the scoring path the library takes on a CPU (from
    `fastest_plan`, which the grid proves equal to the model's own padded forward), and why not a faster one."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lightning_align.modules.reward import body_and_score_head
    from lightning_align.modules.scoring import ONE_ROW_REFUSED, PACKING_REFUSED, fastest_plan

    lines = [
        "| family (tiny config) | model type | SFT / DPO packing | output layer | reward packing | why not faster |",
        "|---|---|---|---|---|---|",
    ]
    cpu = torch.device("cpu")
    for name in ARCHITECTURES:
        config = tiny_config(name, vocab_size=128)
        with torch.device("meta"):
            causal_lm = AutoModelForCausalLM.from_config(config)
            classifier = AutoModelForSequenceClassification.from_config(config)
        plan = fastest_plan(causal_lm, cpu)
        reward = fastest_plan(classifier, cpu, packing=body_and_score_head(classifier) is not None)
        why = [
            reason
            for reasons in (PACKING_REFUSED, ONE_ROW_REFUSED)
            for t, reason in reasons.items()
            if t == config.model_type
        ]
        if plan.output_layer != "chunked":
            why.append("logits are soft-capped or scaled after the output layer")
        if plan.packing == "rows" and not why:
            why.append(f"{config._attn_implementation} attention by default (no per-example kernel)")
        lines.append(
            f"| {name} | {config.model_type} | {plan.packing} | {plan.output_layer} | {reward.packing} | "
            f"{'; '.join(why) or '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(scoring_table())
