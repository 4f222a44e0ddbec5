"""Multi-turn rollouts against an `Environment`: the policy writes a turn (until EOS or the end of a tool call),
the environment answers (tool results, rendered by the chat template) or ends the episode with a reward, and the
policy continues. The rollout keeps every token in one sequence per episode with a mask that is 1 only on the
tokens the policy sampled: tool results and template glue are never trained on, nor counted in the KL or the
loss's normalisation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lightning_align.environments import Environment, EpisodeStats


@dataclass
class Episode:
    row: dict
    prompt_ids: list[int]
    messages: list[dict]
    rendered: str
    ids: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False
    reward: float | None = None
    stats: EpisodeStats = field(default_factory=EpisodeStats)

    def add(self, ids: list[int], sampled: bool, logprobs: list[float] | None = None) -> None:
        self.ids += ids
        self.sampled += [sampled] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def scored_by_the_environment(prompts, completions):
    """The reward source of a module whose environment scores the episodes; never called."""
    raise RuntimeError("the environment scores these episodes; reward functions are not called")


def last_sampled(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last trained position: [batch] (in an episode, tokens from the environment may follow it)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.bool() * positions).argmax(-1)


def left_padded(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    longest = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, longest - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def stop_index(ids: list[int], tokenizer, eos: int, stop: str | None) -> int:
    """How many of a turn's sampled tokens to keep: through its first EOS, or through the token that completes
    `stop` (the end of a tool call), whichever comes first. Whether a prefix's text holds `stop` only turns true as
    the prefix grows, so the shortest such prefix is found by bisection (a few decodes per turn, not one per
    token)."""
    end = ids.index(eos) + 1 if eos in ids else len(ids)
    if not stop or stop not in tokenizer.decode(ids[:end], skip_special_tokens=False):
        return end
    low, high = 0, end  # the prefix of `low` tokens lacks stop, that of `high` holds it
    while high - low > 1:
        middle = (low + high) // 2
        if stop in tokenizer.decode(ids[:middle], skip_special_tokens=False):
            high = middle
        else:
            low = middle
    return high


def episode_rows(batch: dict, group_size: int) -> list[dict]:
    fields = batch.get("fields", {})
    turns = batch.get("messages") or [None] * len(batch["prompts"])
    rows = []
    for i, prompt in enumerate(batch["prompts"]):
        row = {"prompt": prompt, "messages": turns[i], **{name: values[i] for name, values in fields.items()}}
        rows += [dict(row) for _ in range(group_size)]
    return rows


def start_episodes(module, batch: dict, environment: Environment, group_size: int) -> list[Episode]:
    """Each prompt's episodes, rendered with the environment's tool schemas where the template takes them. A chat
    row's episode continues its conversation; a plain prompt is the user's turn."""
    tokenizer = module.tokenizer
    schemas = getattr(environment, "schemas", None)
    episodes = []
    for number, row in enumerate(episode_rows(batch, group_size)):
        if row.get("messages"):
            messages = [dict(message) for message in row["messages"]]
        else:
            messages = [{"role": "user", "content": row["prompt"]}]
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                messages, tools=schemas or None, tokenize=False, add_generation_prompt=True
            )
        else:
            rendered = row["prompt"]
        prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        episodes.append(Episode(row, prompt_ids, messages, rendered, stats=EpisodeStats(episode=number)))
    return episodes


def environment_text(module, episode: Episode, turn_text: str, messages: list[dict], schemas) -> str:
    """The text the environment's answer adds after the policy's turn: the template's rendering of the grown
    conversation (with the next generation prompt) past what is already there."""
    tokenizer = module.tokenizer
    full = tokenizer.apply_chat_template(messages, tools=schemas or None, tokenize=False, add_generation_prompt=True)
    so_far = episode.rendered + turn_text
    if not full.startswith(so_far):
        raise ValueError(
            "the chat template does not render the conversation as growing prefixes (the policy's turn is not "
            "where it was sampled), so tool results cannot be appended; use a template that does, or an "
            "environment that returns raw text"
        )
    episode.rendered = full
    return full[len(so_far) :]


@torch.no_grad()
def sample_episodes(module, batch: dict, environment: Environment, group_size: int, greedy: bool = False) -> dict:
    """A rollout batch of multi-turn episodes, in the form `OnlineRLModule.sample` gives (sequences, masks,
    rewards, the sampler's log-probs), plus `episode_stats`."""
    started = time.perf_counter()
    tokenizer, eos, pad = module.tokenizer, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    parser = getattr(environment, "parser", None)
    stop = parser.stop if parser is not None else None
    schemas = getattr(environment, "schemas", None)
    episodes = start_episodes(module, batch, environment, group_size)
    sampler_logprobs = True  # False once a turn came from model.generate, which gives none
    for turn in range(environment.max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        inputs = left_padded([e.prompt_ids + e.ids for e in active], pad)
        inputs = {key: inputs[key].to(module.device) for key in ("input_ids", "attention_mask")}
        sequences, logprobs = module.generate(inputs, greedy=greedy, logprobs=True)
        width = inputs["input_ids"].shape[1]
        sampler_logprobs = sampler_logprobs and logprobs is not None
        for row, episode in enumerate(active):
            new = sequences[row, width:].tolist()
            keep = stop_index(new, tokenizer, eos, stop)
            keep = min(keep, environment.max_tokens - len(episode.ids))
            sampled_logprobs = logprobs[row, :keep].tolist() if logprobs is not None else None
            episode.add(new[:keep], True, sampled_logprobs)
            text = tokenizer.decode(new[:keep], skip_special_tokens=False)
            content = text[: -len(tokenizer.eos_token)] if text.endswith(tokenizer.eos_token) else text
            episode.messages.append({"role": "assistant", "content": content})
            answer = environment.step(episode.row, episode.messages, episode.prompt_ids + episode.ids, episode.stats)
            if answer.done:
                episode.done, episode.reward = True, answer.reward
                continue
            if turn + 1 == environment.max_turns or len(episode.ids) >= environment.max_tokens:
                episode.done, episode.reward, episode.stats.cut = True, environment.cut_reward, True
                continue
            episode.messages += answer.messages
            if answer.text is not None or not getattr(tokenizer, "chat_template", None):
                added = answer.text or ""
                episode.rendered += text + added
            else:
                added = environment_text(module, episode, text, episode.messages, schemas)
            ids = tokenizer(added, add_special_tokens=False)["input_ids"]
            episode.add(ids[: max(0, environment.max_tokens - len(episode.ids))], False)
            if len(episode.ids) >= environment.max_tokens:
                episode.done, episode.reward, episode.stats.cut = True, environment.cut_reward, True
    generated = time.perf_counter()
    return episode_batch(module, episodes, started, generated, sampler_logprobs)


def episode_batch(
    module, episodes: list[Episode], started: float, generated: float, sampler_logprobs: bool = True
) -> dict:
    pad = module.tokenizer.pad_token_id
    prompts = left_padded([e.prompt_ids for e in episodes], pad)
    width = max(len(e.ids) for e in episodes)
    responses = torch.full((len(episodes), width), pad, dtype=torch.long)
    mask = torch.zeros(len(episodes), width)
    real = torch.zeros(len(episodes), width, dtype=torch.long)
    logprobs = torch.zeros(len(episodes), width)
    for i, e in enumerate(episodes):
        n = len(e.ids)
        responses[i, :n] = torch.tensor(e.ids, dtype=torch.long)
        mask[i, :n] = torch.tensor(e.sampled, dtype=torch.float)
        real[i, :n] = 1
        logprobs[i, :n] = torch.tensor(e.logprobs)
    device = module.device
    reward = torch.tensor([float("nan") if e.reward is None else e.reward for e in episodes], device=device)
    return {
        "sequences": torch.cat([prompts["input_ids"], responses], 1).to(device),
        "attention_mask": torch.cat([prompts["attention_mask"], real], 1).to(device),
        "prompt_length": prompts["input_ids"].shape[1],
        "mask": mask.to(device),
        "ended": torch.tensor([not e.stats.cut for e in episodes], device=device),
        "completions": [e.messages[-1]["content"] for e in episodes],
        "each_reward": reward[:, None],
        "reward": reward,
        # None without the sampler's log-probs: pi_old then comes from a forward pass, never from zeros.
        "sampled_logprobs": logprobs.to(device) * mask.to(device) if sampler_logprobs else None,
        "episode_stats": [e.stats for e in episodes],
        "time/generate": generated - started,
        "time/reward": 0.0,
    }


def episode_metrics(rollout: dict) -> dict[str, float]:
    """Per rollout batch: turns, tool calls, malformed calls and tool errors per episode, the share of episodes
    cut at a limit, and the response tokens trained (sampled) against those from the environment."""
    stats = rollout["episode_stats"]
    count = max(len(stats), 1)
    real = (rollout["attention_mask"][:, rollout["prompt_length"] :]).sum()
    trained = rollout["mask"].sum()
    return {
        "episodes/turns": sum(s.turns for s in stats) / count,
        "episodes/tool_calls": sum(s.tool_calls for s in stats) / count,
        "episodes/malformed_calls": sum(s.malformed_calls for s in stats) / count,
        "episodes/tool_errors": sum(len(s.tool_errors) for s in stats) / count,
        "episodes/cut": sum(s.cut for s in stats) / count,
        "tokens/trained": float(trained) / count,
        "tokens/environment": float(real - trained) / count,
    }
