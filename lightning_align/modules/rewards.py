"""Where PPO's scores come from: a Python function, or a reward model folder (any tokenizer)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path

import torch

RewardFunction = Callable[[list[str], list[str]], list[float]]


class RewardModelScorer:
    """A frozen sequence-classification reward model that scores decoded text with its own tokenizer.

    Held outside the PPO module's submodules: it is not trained and not checkpointed.
    """

    def __init__(self, path: str):
        from lightning_align.modules.reward import RewardModule

        self.name = path
        self.module = RewardModule(path)
        self.module.configure_model()
        self.module.model.eval().requires_grad_(False)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.module.model.to(device=device, dtype=dtype)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.module.score(prompts, completions).tolist()


def resolve_reward(reward: str | RewardFunction) -> tuple[RewardFunction, str]:
    """(scorer, name) from a callable, `"package.module:function"`, or a reward model folder."""
    if callable(reward):
        return reward, getattr(reward, "__qualname__", repr(reward))
    if not isinstance(reward, str):
        raise TypeError(f"reward must be a function, 'package.module:function' or a folder, got {type(reward)}")
    if Path(reward).is_dir():
        return RewardModelScorer(reward), reward
    module_name, _, function_name = reward.partition(":")
    if not function_name:
        raise ValueError(f"reward {reward!r} is neither a reward model folder nor 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {reward!r} could not be imported: {err}") from None
    return function, reward


def checked_scores(scores, expected: int, name: str) -> list[float]:
    """A reward source's output, refused loudly unless it is one finite number per completion."""
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward {name} must return a list of numbers: {err}") from None
    if len(scores) != expected:
        raise ValueError(f"reward {name} returned {len(scores)} scores for {expected} completions")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"reward {name} returned a non-finite score for completion {bad[0]}: {scores[bad[0]]}")
    return scores
