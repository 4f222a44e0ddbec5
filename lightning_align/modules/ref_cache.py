"""Precomputed reference log-probs kept on disk, keyed by everything they depend on."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

CACHE_FILE = "ref_logps.pt"


@torch.no_grad()
def scored_examples(module, examples: list[dict], collate, batch_size: int, score, width: int) -> torch.Tensor:
    """[rows, width]: `score(batch)` ([B, width]) of every example, in order. Each process scores its share of the rows
    and all share the results, so the work is done once per process group."""
    trainer = module.trainer
    world, rank = trainer.world_size, trainer.global_rank
    per_rank = -(-len(examples) // world)
    mine = examples[rank * per_rank : (rank + 1) * per_rank]
    # Equal shares (the last padded with repeats) keep every process in step under sharded strategies.
    mine = mine + examples[: per_rank - len(mine)] if examples else []
    scored = [torch.zeros(0, width)]
    for start in range(0, len(mine), batch_size):
        batch = module.transfer_batch_to_device(collate(mine[start : start + batch_size]), module.device, 0)
        with trainer.precision_plugin.forward_context():
            scored.append(score(batch).float().cpu())
    local = torch.cat(scored)
    if world > 1:
        local = trainer.strategy.all_gather(local.to(module.device)).cpu().reshape(-1, width)
    return local[: len(examples)]


def examples_fingerprint(examples: list[dict]) -> str:
    """Hash of the tokenized pairs: changes with any row, the tokenizer, max_length or the truncation."""
    digest = hashlib.sha256()
    for example in examples:
        for side in ("chosen", "rejected"):
            digest.update(json.dumps([example[side]["input_ids"], example[side]["labels"]]).encode())
    return digest.hexdigest()


def weights_fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_weights(policy: nn.Module, reference) -> list[tuple[str, torch.Tensor]]:
    """The tensors that define the reference: its own network's, or the policy's frozen ones (the base and a
    frozen start adapter) when the reference is the policy with its trained adapter switched off."""
    if reference.network is not None:
        return list(reference.network.named_parameters())
    return [(name, p) for name, p in policy.named_parameters() if not p.requires_grad]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps([type(tokenizer).__name__, vocab, tokenizer.chat_template, tokenizer.special_tokens_map])
    return hashlib.sha256(text.encode()).hexdigest()


class RefLogpsCache:
    """One file `<folder>/ref_logps.pt` holding {"fingerprint": {...}, "logps": {split: Tensor[rows, 2]}},
    written atomically. A file whose fingerprint differs, that cannot be read or is incomplete is recomputed,
    and the log says why."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / CACHE_FILE

    def load(self, fingerprint: dict[str, str], rows: dict[str, int]) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            rank_zero_info(f"reference log-probs: no cache at {self.path} yet; computing them")
            return None
        try:
            saved = torch.load(self.path, weights_only=True)
            logps = saved["logps"]
            complete = all(tuple(logps[split].shape) == (n, 2) for split, n in rows.items())
        except Exception as err:  # a truncated or foreign file: never trust it
            rank_zero_warn(f"reference log-probs cache {self.path} is unreadable ({err}); recomputing")
            return None
        changed = [key for key, value in fingerprint.items() if saved.get("fingerprint", {}).get(key) != value]
        if changed:
            rank_zero_info(
                f"reference log-probs cache {self.path} is stale ({', '.join(changed)} changed); recomputing"
            )
            return None
        if not complete or not all(torch.isfinite(t).all() for t in logps.values()):
            rank_zero_warn(f"reference log-probs cache {self.path} is incomplete; recomputing")
            return None
        rank_zero_info(f"reference log-probs: reusing {self.path}")
        return logps

    def save(self, fingerprint: dict[str, str], logps: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save({"fingerprint": fingerprint, "logps": logps}, partial)
        os.replace(partial, self.path)  # readers see the old file or the whole new one, never half of one
