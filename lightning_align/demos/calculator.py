"""A tool-use task: add two large numbers, which a tiny model cannot do reliably alone but can with a calculator
tool. Prompts with their answers (for GRPO with `ToolEnvironment`), and SFT traces that show the format: the
assistant calls `add`, reads the tool's result and answers with it."""

from __future__ import annotations

import json
import random
from pathlib import Path


def add(a: int, b: int) -> int:
    """Add two integers exactly.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def calculator_prompt(rng: random.Random, digits: int = 5) -> tuple[str, str]:
    a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
    return f"{a}+{b}=", str(a + b)


def answer_reward(row: dict, messages: list[dict]) -> float:
    """1 if the episode's final answer is the row's `answer` exactly, else 0."""
    return float(messages[-1]["content"].strip() == str(row["answer"]).strip())


def tool_trace(prompt: str, answer: str) -> list[dict]:
    """The conversation that solves `prompt` with the calculator: call, result, answer."""
    a, b = prompt.rstrip("=").split("+")
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": int(a), "b": int(b)}}}
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": answer},
        {"role": "assistant", "content": answer},
    ]


def direct_trace(prompt: str, answer: str) -> list[dict]:
    """The conversation that answers `prompt` without the tool."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def write_calculator_data(
    folder: str | Path,
    n_train: int = 2000,
    n_val: int = 200,
    seed: int = 0,
    digits: int = 5,
    tool_share: float = 1.0,
) -> dict:
    """`calculator_sft_{train,val}.jsonl` (tool-use traces, with the tool's schema) and
    `calculator_prompts_{train,val}.jsonl` (prompts with their `answer`), disjoint halves of one seeded draw.
    Returns the paths by name."""
    from transformers.utils import get_json_schema

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tools = [get_json_schema(add)]  # what `ToolEnvironment([add], ...)` gives the template: SFT sees RL's prompts
    rng = random.Random(seed)
    rows = [calculator_prompt(rng, digits) for _ in range(2 * (n_train + n_val))]
    halves = {"sft": rows[: n_train + n_val], "prompts": rows[n_train + n_val :]}
    paths = {}
    for kind, pairs in halves.items():
        for split, part in (("train", pairs[:n_train]), ("val", pairs[n_train:])):
            path = folder / f"calculator_{kind}_{split}.jsonl"
            with open(path, "w") as f:
                for prompt, answer in part:
                    if kind == "prompts":
                        row = {"prompt": prompt, "answer": answer}
                    elif rng.random() < tool_share:
                        row = {"messages": tool_trace(prompt, answer), "tools": tools}
                    else:
                        row = {"messages": direct_trace(prompt, answer), "tools": tools}
                    f.write(json.dumps(row) + "\n")
            paths[f"calculator_{kind}_{split}"] = str(path)
    return paths
