"""Tiny random-weight models of the architecture grid's families (`lightning_align.scoring.families`), saved with
the demo tokenizer, and the README's table of scoring paths."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_align.scoring.families import ARCHITECTURES, tiny_config


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

    from lightning_align.scoring.plan import ONE_ROW_REFUSED, PACKING_REFUSED, fastest_plan
    from lightning_align.scoring.scores import body_and_score_head

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
