"""Tiny model, tokenizer and verifiable tasks for demos and tests (like `lightning.pytorch.demos`)."""

from lightning_align.demos import assets  # noqa: F401 - registers the demo's model and data names
from lightning_align.demos.evaluate import generate_completions, task_accuracy
from lightning_align.demos.tasks import TASK_NAMES, answer, is_correct, task_reward, write_task_data, wrong_answer
from lightning_align.demos.tiny import build_tokenizer, tiny_model_path

__all__ = [
    "TASK_NAMES",
    "answer",
    "build_tokenizer",
    "generate_completions",
    "is_correct",
    "task_accuracy",
    "task_reward",
    "tiny_model_path",
    "write_task_data",
    "wrong_answer",
]
