"""Held-out accuracy on the calculator task, with the tool and without it, for measuring the tool-use stages of
the demo (SFT on tool-use traces, GRPO with the calculator, GRPO without it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_align.demos.calculator import add, answer_reward
from lightning_align.environments import ToolEnvironment
from lightning_align.modules.sampling import generate_completions


@dataclass
class ToolAccuracy:
    """Greedy episodes on held-out prompts: exact answers, tool calls per episode, and the share of the calls
    that were well formed (parsed and run)."""

    accuracy: float
    tool_calls: float
    well_formed: float


def held_out_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in open(path)]
    return rows[:limit] if limit else rows


def calculator_environment(reward=answer_reward) -> ToolEnvironment:
    return ToolEnvironment([add], reward=reward, max_turns=3, max_tokens=160, cut_reward=0.0, error_penalty=0.0)


@torch.no_grad()
def accuracy_with_tool(module, rows: list[dict], batch_size: int = 100) -> ToolAccuracy:
    """Greedy episodes of an online module's policy (`module.tokenizer` set) against the calculator, scored exact."""
    from lightning_align.modules.episodes import sample_episodes

    environment = calculator_environment()
    rewards, stats = [], []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        batch = {"prompts": [r["prompt"] for r in part], "fields": {"answer": [r["answer"] for r in part]}}
        rollout = sample_episodes(module, batch, environment, 1, greedy=True)
        rewards += rollout["reward"].tolist()
        stats += rollout["episode_stats"]
    calls = sum(s.tool_calls for s in stats)
    malformed = sum(s.malformed_calls for s in stats)
    return ToolAccuracy(
        accuracy=sum(rewards) / len(rewards),
        tool_calls=calls / len(stats),
        well_formed=calls / (calls + malformed) if calls + malformed else 0.0,
    )


@torch.no_grad()
def accuracy_without_tool(model, tokenizer, rows: list[dict], max_new_tokens: int = 96) -> float:
    """Share of held-out prompts (rendered by the chat template, no tools) whose greedy reply is the exact sum."""
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    prompts = [text.removeprefix(tokenizer.bos_token) for text in rendered]  # generate_completions adds BOS
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens)
    return sum(c.strip() == str(r["answer"]) for c, r in zip(completions, rows, strict=True)) / len(rows)
