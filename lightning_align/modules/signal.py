"""Whether a rollout batch can teach anything, and DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): groups whose
samples all got the same reward have zero advantage, so they are dropped and the batch is filled with the groups
of further prompts."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

# Keys of a sampled rollout (`OnlineRLModule.sample`) with one entry per sample.
PER_SAMPLE = ("sequences", "attention_mask", "mask", "ended", "each_reward", "reward", "sampled_logprobs")


def groups_with_spread(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] whether a group's rewards differ (an abstention, NaN, counts as 0, as the advantages take it)."""
    return reward.nan_to_num().view(-1, group_size).std(1, correction=0) > 0


def rollout_rows(rollout: dict, rows: torch.Tensor) -> dict:
    """The rollout restricted to the samples at `rows` (indices)."""
    kept = dict(rollout)
    for key in PER_SAMPLE:
        if rollout.get(key) is not None:
            kept[key] = rollout[key][rows]
    kept["completions"] = [rollout["completions"][i] for i in rows.tolist()]
    return kept


def merged_rollouts(rollouts: list[dict], pad_token_id: int) -> dict:
    """One rollout from several sampled ones: prompts left-padded and responses right-padded to the widest."""
    prompt_length = max(r["prompt_length"] for r in rollouts)
    response_length = max(r["sequences"].shape[1] - r["prompt_length"] for r in rollouts)

    def laid_out(r: dict, key: str, pad) -> torch.Tensor:
        tensor, split = r[key], r["prompt_length"]
        if key in ("mask", "sampled_logprobs"):  # response positions only
            return torch.nn.functional.pad(tensor, (0, response_length - tensor.shape[1]), value=pad)
        prompt = torch.nn.functional.pad(tensor[:, :split], (prompt_length - split, 0), value=pad)
        response = tensor[:, split:]
        return torch.cat(
            [prompt, torch.nn.functional.pad(response, (0, response_length - response.shape[1]), value=pad)], 1
        )

    merged = {
        "sequences": torch.cat([laid_out(r, "sequences", pad_token_id) for r in rollouts]),
        "attention_mask": torch.cat([laid_out(r, "attention_mask", 0) for r in rollouts]),
        "mask": torch.cat([laid_out(r, "mask", 0) for r in rollouts]),
        "prompt_length": prompt_length,
        "completions": [c for r in rollouts for c in r["completions"]],
    }
    for key in ("ended", "each_reward", "reward"):
        merged[key] = torch.cat([r[key] for r in rollouts])
    logprobs = [r["sampled_logprobs"] for r in rollouts]
    merged["sampled_logprobs"] = (
        torch.cat([laid_out(r, "sampled_logprobs", 0.0) for r in rollouts])
        if all(x is not None for x in logprobs)
        else None
    )
    for key in ("time/generate", "time/reward"):
        merged[key] = sum(r[key] for r in rollouts)
    return merged


class NoLearningSignal(RuntimeError):
    """Too many rollout batches in a row taught nothing."""


class LearningSignal:
    """Counts rollout batches in a row without a learning signal: warns at each, stops after `patience`."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.in_a_row = 0

    def update(self, has_signal: bool, reward: torch.Tensor, what: str) -> None:
        if has_signal:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        scored = reward[~reward.isnan()]
        seen = (
            f"every reward abstained (None) on all {len(reward)} samples"
            if not len(scored)
            else f"{what} (rewards seen: {sorted({round(float(r), 4) for r in scored})[:5]})"
        )
        message = (
            f"rollout batch without a learning signal ({self.in_a_row} in a row): {seen}, so every advantage is 0 "
            "and this batch teaches nothing. Check the reward on a few completions, raise temperature or "
            "num_generations, or set dynamic_sampling=True to replace such groups with further prompts"
        )
        if self.patience is not None and self.in_a_row >= self.patience:
            raise NoLearningSignal(f"stopped: {message} (max_batches_without_signal={self.patience})")
        rank_zero_warn(message)


class GroupBuffer:
    """Dynamic sampling: collects the groups with reward spread of successive rollout batches until there are as
    many as one batch has prompts; extra groups of the batch that fills it are dropped (as DAPO does)."""

    def __init__(self):
        self.rollouts: list[dict] = []
        self.groups = 0

    def add(self, rollout: dict, spread: torch.Tensor, group_size: int) -> None:
        keep = spread.nonzero()[:, 0]
        if len(keep):
            rows = (keep[:, None] * group_size + torch.arange(group_size, device=keep.device)).flatten()
            self.rollouts.append(rollout_rows(rollout, rows))
            self.groups += len(keep)

    def full_batch(self, groups: int, group_size: int, pad_token_id: int) -> dict | None:
        """The first `groups` collected groups as one rollout (and the buffer emptied), or None while short."""
        if self.groups < groups:
            return None
        merged = merged_rollouts(self.rollouts, pad_token_id)
        self.rollouts, self.groups = [], 0
        return rollout_rows(merged, torch.arange(groups * group_size, device=merged["sequences"].device))
