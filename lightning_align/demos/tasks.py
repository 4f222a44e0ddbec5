"""Synthetic tasks with verifiable answers: sort digits, reverse a word, add two numbers.

Each task makes prompts, knows the right answer, makes a plausible wrong answer (the rejected response of a
preference pair) and scores a completion. They are small enough for a tiny model to learn on a CPU in minutes.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

TASK_NAMES = ("sort", "reverse", "add")
# The second answer style of mixed SFT data (see `write_task_data`); the preferred answer is always the bare one.
VERBOSE_PREFIX = "Answer: "


def make_prompt(task: str, rng: random.Random) -> str:
    if task == "sort":
        return "sort: " + "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 5)))
    if task == "reverse":
        return "reverse: " + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 5)))
    if task == "add":
        return f"add: {rng.randint(0, 49)}+{rng.randint(0, 49)}"
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_NAMES)}")


def answer(prompt: str) -> str:
    """The correct completion of a task prompt."""
    task, _, operand = prompt.strip().partition(": ")
    if task == "sort":
        return "".join(sorted(operand))
    if task == "reverse":
        return operand[::-1]
    if task == "add":
        left, right = operand.split("+")
        return str(int(left) + int(right))
    raise ValueError(f"not a task prompt: {prompt!r}")


def wrong_answer(prompt: str, rng: random.Random) -> str:
    """A plausible mistake: two characters swapped, or a sum that is off by one or ten."""
    right = answer(prompt)
    if prompt.strip().startswith("add: "):
        return str(int(right) + rng.choice([-10, -1, 1, 10]) if int(right) >= 10 else int(right) + 1)
    chars = list(right)
    pairs = [(i, j) for i in range(len(chars)) for j in range(i + 1, len(chars)) if chars[i] != chars[j]]
    if not pairs:  # all characters equal: any change must alter a character
        return right[:-1] + ("0" if right[-1] != "0" else "1")
    i, j = rng.choice(pairs)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def is_correct(prompt: str, completion: str, any_style: bool = False) -> bool:
    """Whether the completion is exactly the answer; with `any_style` the verbose form counts too."""
    given = completion.strip()
    if any_style and given.startswith(VERBOSE_PREFIX):
        given = given[len(VERBOSE_PREFIX) :]
    return given == answer(prompt)


def task_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward for PPO: 1 for the exact answer, else the share of answer characters in the right place."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        right, given = answer(prompt), completion.strip()
        if given == right:
            rewards.append(1.0)
            continue
        hits = sum(a == b for a, b in zip(right, given))
        rewards.append(0.5 * hits / max(len(right), len(given), 1))
    return rewards


def make_prompts(n: int, seed: int, tasks: tuple[str, ...] = TASK_NAMES) -> list[str]:
    rng = random.Random(seed)
    return [make_prompt(tasks[i % len(tasks)], rng) for i in range(n)]


def write_task_data(
    root: str | Path,
    n_train: int = 3000,
    n_val: int = 300,
    seed: int = 0,
    tasks: tuple[str, ...] = TASK_NAMES,
    verbose_share: float = 0.0,
) -> dict[str, Path]:
    """Write SFT, preference and prompt JSONL files for the tasks; returns their paths by name.

    SFT, preference and prompt files each have their own training prompts; validation prompts are shared by the
    three and overlap none of them, so held-out accuracy measures generalisation.

    `verbose_share` makes the SFT data mixed, as data pooled from several sources is: that share of completions
    is written "Answer: <answer>". The preference data then prefers the bare answer: half its rejected responses
    are the verbose form of the right answer, the others a wrong bare answer. This is the kind of fault that
    preference training and RL fix (the tiny model's arithmetic mistakes are a matter of capability instead).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    kinds = ("sft", "preference", "prompts")
    # Each stage trains on prompts of its own, as real pipelines do; validation prompts are shared and unseen.
    train = {kind: make_prompts(n_train, seed + 1000 * i, tasks) for i, kind in enumerate(kinds)}
    seen = set().union(*train.values())
    val = [p for p in make_prompts(n_val * 3, seed + 10_000, tasks) if p not in seen][:n_val]
    style_rng = random.Random(seed + 2)

    def sft_completion(p: str) -> str:
        return (VERBOSE_PREFIX if style_rng.random() < verbose_share else "") + answer(p)

    def rejected(p: str) -> str:
        if verbose_share > 0 and style_rng.random() < 0.5:
            return VERBOSE_PREFIX + answer(p)
        return wrong_answer(p, rng)

    rows = {
        "sft": lambda p: {"prompt": p + "\n", "completion": sft_completion(p)},
        "preference": lambda p: {"prompt": p + "\n", "chosen": answer(p), "rejected": rejected(p)},
        "prompts": lambda p: {"prompt": p + "\n"},
    }
    paths = {}
    for kind, make_row in rows.items():
        for split, prompts in (("train", train[kind]), ("val", val)):
            path = root / f"{kind}_{split}.jsonl"
            with open(path, "w") as f:
                for p in prompts:
                    f.write(json.dumps(make_row(p)) + "\n")
            paths[f"{kind}_{split}"] = path
    return paths
