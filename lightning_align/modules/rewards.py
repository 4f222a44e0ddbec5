"""Where online RL's scores come from: Python functions and reward model folders (any tokenizer), one or several,
weighted and combined."""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lightning_align.losses import combined_rewards

# (prompts, completions, **row_fields) -> one score per completion, or None where the reward abstains.
RewardFunction = Callable[..., list[float | None]]
RewardSource = str | RewardFunction


class RewardModelScorer:
    """A frozen sequence-classification reward model that scores decoded text with its own tokenizer.

    Held outside the training module's submodules: it is not trained and not checkpointed.
    """

    def __init__(self, path: str):
        from lightning_align.modules.reward import RewardModule

        check_reward_model_folder(path)
        self.name = path
        self.module = RewardModule(path)
        self.module.configure_model()
        self.module.model.eval().requires_grad_(False)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.module.model.to(device=device, dtype=dtype)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.module.score(prompts, completions).tolist()


def check_reward_model_folder(path: str) -> None:
    """Refuse a folder that holds no trained score head (a causal LM, say): loading it as a reward model would
    attach a randomly initialised head and train the policy against noise."""
    folder = Path(path)
    config, adapter = folder / "config.json", folder / "adapter_config.json"
    if config.exists():
        architectures = json.loads(config.read_text()).get("architectures") or []
        if any(name.endswith("ForSequenceClassification") for name in architectures):
            return
        held = ", ".join(architectures) or "a model of unknown architecture"
    elif adapter.exists():
        settings = json.loads(adapter.read_text())
        if settings.get("task_type") == "SEQ_CLS" or "score" in (settings.get("modules_to_save") or []):
            return
        held = "an adapter without a score head"
    else:
        raise ValueError(f"reward model folder '{path}' has neither config.json nor adapter_config.json")
    raise ValueError(
        f"reward model folder '{path}' holds {held}, not a trained reward model (a sequence classifier with a "
        "`score` head): loaded as one, its head would be initialised at random and the policy trained against "
        "noise. Train a reward model with RewardModule and export it (ExportPretrained), or pass a reward function"
    )


def resolve_reward(reward: RewardSource) -> tuple[RewardFunction, str]:
    """(scorer, name) from a callable, `"package.module:function"`, or a reward model folder."""
    if callable(reward):
        return reward, getattr(reward, "__name__", type(reward).__name__)
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
    """A reward source's output: one finite number (or None: abstained, returned as NaN) per completion, or a
    clear error."""
    try:
        scores = list(scores)
        numbers = [None if s is None else float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward {name} must return a list of numbers (or None to abstain): {err}") from None
    if len(numbers) != expected:
        raise ValueError(f"reward {name} returned {len(numbers)} scores for {expected} completions")
    for i, number in enumerate(numbers):
        if number is not None and not math.isfinite(number):
            raise ValueError(f"reward {name} returned a non-finite score for completion {i}: {number}")
    return [math.nan if number is None else number for number in numbers]


def accepted_fields(function: RewardFunction, fields: dict[str, list]) -> dict[str, list]:
    """The row fields a reward function takes: all of them with **kwargs, else those it names."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(fields)
    names = {p.name for p in parameters}
    return {name: values for name, values in fields.items() if name in names}


class Rewards:
    """Several reward sources, each `(prompts, completions, **row_fields) -> scores`, weighted and combined.

    Args:
        sources: one source or a list: functions, their import paths `"package.module:function"`, or reward model
            folders (`RewardModule` exports). A function receives the row fields it names (or all, with
            **kwargs) as lists over the batch: a verifier reads the row's reference answer. A score of None
            abstains: the sample gets weight 0 from that source (and advantage 0 if every source abstains).
        weights: one per source (default 1 each).
        aggregation: "sum_then_normalize" or "normalize_then_sum" (see `losses.combined_rewards`).
    """

    def __init__(
        self,
        sources: RewardSource | Sequence[RewardSource],
        weights: Sequence[float] | None = None,
        aggregation: str = "sum_then_normalize",
    ):
        from lightning_align.losses import REWARD_AGGREGATIONS

        self.sources = [sources] if callable(sources) or isinstance(sources, str) else list(sources)
        if not self.sources:
            raise ValueError("no reward given: pass a function, its import path, or a reward model folder")
        if weights is not None and len(weights) != len(self.sources):
            raise ValueError(f"{len(weights)} reward_weights for {len(self.sources)} rewards; give one per reward")
        if aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(f"unknown reward_aggregation {aggregation!r}; valid: {', '.join(REWARD_AGGREGATIONS)}")
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * len(self.sources))
        self.aggregation = aggregation
        self.functions: list[RewardFunction] | None = None
        self.names: list[str] = []

    def resolve(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """Load the sources once (reward models on `device`, in `dtype`)."""
        if self.functions is not None:
            return
        resolved = [resolve_reward(source) for source in self.sources]
        self.functions = [function for function, _ in resolved]
        names = [name for _, name in resolved]
        self.names = [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]
        for function in self.functions:
            if hasattr(function, "to"):
                function.to(device, dtype)

    def score(self, prompts: list[str], completions: list[str], fields: dict[str, list] | None = None) -> torch.Tensor:
        """Each source's scores: [batch, sources], NaN where a source abstained."""
        if self.functions is None:
            raise RuntimeError("Rewards.resolve must be called before scoring")
        columns = []
        for function, name in zip(self.functions, self.names):
            try:
                raw = function(prompts, completions, **accepted_fields(function, fields or {}))
            except Exception as err:  # a user function: say whose error it is
                raise RuntimeError(f"reward {name} raised {type(err).__name__}: {err}") from err
            columns.append(checked_scores(raw, len(completions), name))
        return torch.tensor(columns, dtype=torch.float32).T

    def combine(self, scores: torch.Tensor, group_size: int = 1) -> torch.Tensor:
        """One reward per sample [batch] (NaN where every source abstained)."""
        return combined_rewards(scores, self.weights, self.aggregation, group_size)

    def means(self, scores: torch.Tensor) -> dict[str, float]:
        """Each source's mean over the samples it scored (for the log)."""
        if len(self.names) == 1:
            return {}
        return {f"reward/{name}": float(torch.nanmean(scores[:, k])) for k, name in enumerate(self.names)}
