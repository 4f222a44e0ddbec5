"""Greedy generation and task accuracy, for measuring a model before and after training."""

from __future__ import annotations

import torch

from lightning_align.demos.tasks import is_correct


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 64):
    """Greedy completions of plain-text prompts, decoded without special tokens."""
    was_training = model.training
    model.eval()
    # Left padding keeps every prompt's last token next to its first generated token.
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions = []
    try:
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            completions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions


def task_accuracy(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, any_style: bool = False) -> float:
    """Share of prompts whose greedy completion is exactly the task's answer (the bare answer, which is also the
    chosen response of the preference data; with `any_style` the verbose form counts too)."""
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens)
    return sum(is_correct(p, c, any_style) for p, c in zip(prompts, completions)) / len(prompts)
