"""Sampling the rollouts of online RL: a plain decode loop over the Hugging Face KV cache.

`model.generate` spends, on a CPU with a 32k vocabulary, about as long on its general machinery as on the
model: `torch.multinomial` draws an exponential variate for every vocabulary entry of every row and step, and
the logits processors and mask building add passes over the same logits. Drawing one uniform number per row and
inverting the cumulative distribution samples exactly the same distribution. The loop is used for the model
families of the architecture grid, where a test shows its greedy tokens equal to `generate`'s; any other model
samples with `generate`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_align.modules.sharding import gathered_while_decoding
from lightning_align.scoring.model import unwrapped


def next_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    share: ProcessShare | None = None,
) -> torch.Tensor:
    """One token per row [batch] from next-token logits [batch, vocab]: the most likely with `greedy`, else a draw
    from softmax(logits / temperature) restricted to the `top_k` most likely tokens (0: all) and to the smallest
    set of most likely tokens whose probability reaches `top_p` (the nucleus), by inverting the cumulative
    distribution at one uniform draw per row (this process's rows' draws from `share`, when given)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens more likely than each
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cumulative = probs.cumsum(-1)
    if share is None:
        draw = torch.rand(len(probs), 1, device=probs.device, dtype=cumulative.dtype)
    else:
        draw = share.uniform(len(probs), probs.device, cumulative.dtype)
    draw = draw * cumulative[:, -1:]
    chosen = torch.searchsorted(cumulative, draw, right=True).squeeze(-1)
    return chosen.clamp(max=probs.shape[-1] - 1)


@dataclass
class ProcessShare:
    """This process's part of a rollout batch split over `world` processes: the data's prompts are dealt as
    `EpochPermutation` deals them (this process's prompt i is the global batch's prompt i * world + rank), each
    followed by its `group` samples. The decode loop draws one uniform number for every row of the global batch
    at each step, the same on every process, and keeps its own rows': N processes then sample the tokens one
    process with the whole batch samples (with one process the draws are the plain loop's). `any_running` tells
    whether a row is still being sampled on any process, so every process runs the same steps and draws."""

    rank: int
    world: int
    group: int
    any_running: Callable[[bool], bool]

    def uniform(self, rows: int, device, dtype) -> torch.Tensor:
        if self.world == 1:
            return torch.rand(rows, 1, device=device, dtype=dtype)
        draws = torch.rand(rows // self.group * self.world, self.group, device=device, dtype=dtype)
        return draws[self.rank :: self.world].reshape(-1, 1)


# Families that decode with a growing cache: their attention reads a mask as long as the keys cached so far.
STATIC_CACHE_REFUSED = {"bloom": "its ALiBi biases are built from an attention mask as long as the cache"}


@functools.cache
def forward_takes(model_class: type, name: str) -> bool:
    return name in inspect.signature(model_class.forward).parameters


def decode_loop_proven(model: nn.Module) -> bool:
    """Whether the architecture grid covers this model's family (its test compares the loop with `generate`)."""
    from lightning_align.scoring.families import grid_model_types

    base = unwrapped(model)
    return getattr(base.config, "model_type", None) in grid_model_types() and cache_argument(type(base)) is not None


def cache_argument(model_class: type) -> str | None:
    """The name under which the model's forward takes its KV cache (transformers renamed it in version 5)."""
    for name in ("cache", "past_key_values"):
        if forward_takes(model_class, name):
            return name
    return None


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    min_new_tokens: int = 0,
    return_logprobs: bool = False,
    share: ProcessShare | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts followed by their sampled responses [batch, prompt + response]: after a row's EOS its
    tokens are `pad_token_id`, and the loop stops when every row has ended (on every process of `share`) or at
    `max_new_tokens`.

    With `return_logprobs`, also log softmax(logits / temperature) of each chosen token [batch, response] (the
    whole distribution, before top-k / top-p filtering, as a learning pass scores it): the rollout's log-probs
    without another forward pass."""
    from transformers import DynamicCache, StaticCache

    base = unwrapped(model)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    positions = {"position_ids": position_ids} if forward_takes(type(base), "position_ids") else {}
    prompt_length = input_ids.shape[1]
    if getattr(base.config, "model_type", None) in STATIC_CACHE_REFUSED:
        cache = {cache_argument(type(base)): DynamicCache(config=base.config)}  # filled in place by each forward
    else:
        # Preallocated for the whole response and filled in place at `cache_position`: a growing cache would copy
        # every layer's keys and values at every step.
        static = StaticCache(config=base.config, max_cache_len=prompt_length + max_new_tokens)
        where = torch.arange(prompt_length, device=input_ids.device)
        cache = {cache_argument(type(base)): static, "cache_position": where}
    last_only = {"logits_to_keep": 1} if forward_takes(type(base), "logits_to_keep") else {}  # not the prompt's
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **cache, **positions, **last_only)
    ended = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    chosen, logprobs = [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        scaled = logits.float() / temperature
        if step < min_new_tokens:
            logits = logits.clone()
            logits[:, eos_token_id] = float("-inf")
        token = next_tokens(logits, temperature, top_k, top_p, greedy, share).masked_fill(ended, pad_token_id)
        chosen.append(token)
        if return_logprobs:
            logprobs.append(scaled.gather(-1, token[:, None]).squeeze(-1) - scaled.logsumexp(-1))
        ended |= token == eos_token_id
        running = not bool(ended.all())
        if share is not None:
            running = share.any_running(running)
        if not running or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        if positions:
            positions["position_ids"] = positions["position_ids"][:, -1:] + 1
        if "cache_position" in cache:
            cache["cache_position"] = cache["cache_position"][-1:] + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, use_cache=True, **cache, **positions)
    sequences = torch.cat([input_ids, torch.stack(chosen, dim=1)], dim=1)
    return (sequences, torch.stack(logprobs, dim=1)) if return_logprobs else sequences


class Sampler:
    """Sampling of one policy: the decode loop where proven, else `model.generate` (said once in the log)."""

    def __init__(self):
        self.use_loop: bool | None = None

    def __call__(
        self,
        model,
        input_ids,
        attention_mask,
        eos_token_id,
        pad_token_id,
        greedy=False,
        logprobs=False,
        share: ProcessShare | None = None,
        **sampling,
    ):
        """(sequences, their responses' log-probs from the decode loop when `logprobs` is asked for and the loop
        sampled, else None). With several processes, `share` keeps them in step (see `ProcessShare`)."""
        if self.use_loop is None:
            self.use_loop = decode_loop_proven(model)
            base = unwrapped(model)
            how = (
                "this library's decode loop (proven equal to generate's tokens by the architecture grid)"
                if self.use_loop
                else "model.generate (its family is not in the architecture grid)"
            )
            model_type = getattr(base.config, "model_type", "?")
            if self.use_loop and model_type in STATIC_CACHE_REFUSED:
                how += f"; a growing KV cache, not a preallocated one: {STATIC_CACHE_REFUSED[model_type]}"
            rank_zero_info(f"sampling {model_type} ({type(base).__name__}): {how}")
        if self.use_loop:
            out = decode(
                model,
                input_ids,
                attention_mask,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                greedy=greedy,
                return_logprobs=logprobs,
                share=share,
                **sampling,
            )
            return out if logprobs else (out, None)
        options = {"do_sample": False} if greedy else {"do_sample": True, **sampling}
        options["max_new_tokens"] = sampling["max_new_tokens"]
        if "min_new_tokens" in sampling:
            options["min_new_tokens"] = sampling["min_new_tokens"]
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            # every process runs the same steps (sharded weights are gathered by each forward on all of them)
            synced_gpus=share is not None and share.world > 1,
            **options,
        )
        return sequences, None


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 64):
    """Greedy completions of plain-text prompts, decoded without special tokens."""
    was_training = model.training
    model.eval()
    # Left padding keeps every prompt's last token next to its first generated token.
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions = []
    try:
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            with gathered_while_decoding(model):  # every process generates the same prompts, so the same steps
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            completions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions
