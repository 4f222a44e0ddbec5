"""Greedy generation and task accuracy, for measuring a model before and after training."""

from __future__ import annotations

from lightning_align.demos.tasks import is_correct
from lightning_align.modules.sampling import generate_completions


def task_accuracy(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, any_style: bool = False) -> float:
    """Share of prompts whose greedy completion is exactly the task's answer (the bare answer, which is also the
    chosen response of the preference data; with `any_style` the verbose form counts too)."""
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens)
    return sum(is_correct(p, c, any_style) for p, c in zip(prompts, completions)) / len(prompts)
