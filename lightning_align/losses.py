"""Every loss of the library as a pure tensor function, with its formula and source.

Conventions: `logits` are [batch, seq, vocab] and `labels` [batch, seq] with `ignore_index` on unscored positions.
Position t of the logits predicts token t+1, so functions taking both shift them inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-token log p(label_t | prefix) and the mask of scored positions, both [batch, seq-1].

    logp_t = logits[t-1, label_t] - logsumexp(logits[t-1, :]); unscored positions get 0.
    """
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax in at least float32
        logits = logits.float()
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)
    # Gather before normalising: never holds a second [batch, seq, vocab] tensor of log-probabilities.
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask, mask


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """Sum over scored tokens of log p(label_t | prefix), per sequence: [batch].

    sum_t m_t log p(y_t | y_<t), or with `average=True` that sum divided by sum_t m_t (length-normalised, as SimPO).
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, num_scored_tokens: Tensor | int | None = None):
    """Completion-only cross-entropy: -sum_t m_t log p(y_t | y_<t) / N.

    N is the number of scored tokens in this batch, or `num_scored_tokens` when the normaliser must span several
    micro-batches (gradient accumulation, data parallelism), so that every token weighs the same.
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    normaliser = mask.sum() if num_scored_tokens is None else num_scored_tokens
    return -logps.sum() / torch.as_tensor(normaliser, dtype=logps.dtype, device=logps.device).clamp(min=1)


def pairwise_reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry loss, mean of -log sigmoid(r+ - r- - m)  (Ouyang et al. 2022, eq. 1; margin as in Llama 2).

    chosen_rewards, rejected_rewards: [batch] scalar rewards; margin: optional [batch] required gap.
    """
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        gap = gap - margin
    return -F.logsigmoid(gap).mean()
