"""The environment a tool-using rollout talks to: after each of the policy's turns it answers with what to append
(tool results) or that the episode is over, with its reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lightning_align.environments.tools import Tool, ToolCallParser, ToolError, resolve_function

ON_ERROR = ("penalty", "raise")


@dataclass
class Turn:
    """The environment's answer to one policy turn.

    done: the episode is over; reward: its reward then (None: the reward abstains); messages: `tool` messages to
    append, rendered by the chat template; text: raw text to append instead (models without a template);
    turn_reward: an optional reward for this turn alone.
    """

    done: bool
    reward: float | None = None
    messages: list[dict] = field(default_factory=list)
    text: str | None = None
    turn_reward: float | None = None


@dataclass
class EpisodeStats:
    """What one episode did, for the rollout's metrics (and its number in the rollout batch, for messages)."""

    episode: int = 0
    turns: int = 0
    tool_calls: int = 0
    malformed_calls: int = 0
    tool_errors: list[str] = field(default_factory=list)
    cut: bool = False  # ended by the turn or token limit, not by the policy


class Environment:
    """The interface of a multi-turn environment: `step` after every policy turn, with the episode's prompt row
    (its fields: a verifier's answer), the conversation so far (messages, the last one the policy's), its token
    ids and the episode's `EpisodeStats` to count into. `max_turns` and `max_tokens` bound an episode: the rollout
    cuts it there, counts it, and gives it `cut_reward` (None: the reward abstains, so it teaches nothing)."""

    max_turns: int = 4
    max_tokens: int = 512
    cut_reward: float | None = None

    def step(self, row: dict, messages: list[dict], token_ids: Sequence[int], stats: EpisodeStats) -> Turn:
        raise NotImplementedError


class ToolEnvironment(Environment):
    """Plain Python functions as tools: each policy turn's calls (found by `parser`) are run and their results
    appended as `tool` messages; a turn without a call ends the episode, scored by `reward(row, messages)`.

    Args:
        tools: functions with typed arguments and a docstring (or `Tool`s, or import paths
            "package.module:function" in YAML); their schemas are `schemas`, for the chat template's `tools`.
        reward: the episode's score from the prompt row and the whole conversation (None abstains); a function
            or its import path.
        parser: where calls are in the text (`ToolCallParser`: JSON between <tool_call> markers by default).
        max_turns, max_tokens, cut_reward: the episode's limits and the reward of an episode cut by them.
        on_error: a tool that raises, hangs past `timeout` or returns no text, or a call of an unknown tool:
            "penalty" ends the episode with reward `error_penalty` (the error is counted and kept in the episode's
            stats), "raise" stops the run with `ToolError` naming the tool and the episode.
        error_penalty: that episode's reward.
        timeout: seconds per tool call (for functions given bare).
    """

    def __init__(
        self,
        tools: Sequence[Callable | Tool | str],
        reward: Callable[[dict, list[dict]], float | None] | str,
        parser: ToolCallParser | None = None,
        max_turns: int = 4,
        max_tokens: int = 512,
        cut_reward: float | None = None,
        on_error: str = "penalty",
        error_penalty: float = -1.0,
        timeout: float = 10.0,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"unknown on_error {on_error!r}; valid: {', '.join(ON_ERROR)}")
        if max_turns < 1 or max_tokens < 1:
            raise ValueError("max_turns and max_tokens must be at least 1")
        self.tools = {tool.name: tool for tool in (t if isinstance(t, Tool) else Tool(t, timeout) for t in tools)}
        self.reward = resolve_function(reward, "reward")
        self.parser = parser or ToolCallParser()
        self.max_turns, self.max_tokens, self.cut_reward = max_turns, max_tokens, cut_reward
        self.on_error, self.error_penalty = on_error, error_penalty

    @property
    def schemas(self) -> list[dict]:
        return [tool.schema for tool in self.tools.values()]

    def step(self, row: dict, messages: list[dict], token_ids: Sequence[int], stats: EpisodeStats) -> Turn:
        stats.turns += 1
        parsed = self.parser.parse(messages[-1].get("content") or "")
        stats.malformed_calls += len(parsed.malformed)
        if not parsed.calls:  # the policy answered: the episode is over
            return Turn(done=True, reward=self.reward(row, messages))
        results = []
        for call in parsed.calls:
            stats.tool_calls += 1
            try:
                tool = self.tools.get(call.name)
                if tool is None:
                    known = ", ".join(self.tools) or "none"
                    raise ToolError(f"episode {stats.episode} called unknown tool {call.name!r} (tools: {known})")
                results.append({"role": "tool", "name": call.name, "content": tool(call.arguments, stats.episode)})
            except ToolError as error:
                if self.on_error == "raise":
                    raise
                stats.tool_errors.append(str(error))
                return Turn(done=True, reward=self.error_penalty)
        return Turn(done=False, messages=results)
