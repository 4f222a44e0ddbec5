"""Environments for multi-turn, tool-using rollouts: the interface, plain functions as tools, and the parser of
tool calls."""

from lightning_align.environments.base import Environment, EpisodeStats, ToolEnvironment, Turn
from lightning_align.environments.tools import ParsedCalls, Tool, ToolCall, ToolCallParser, ToolError

__all__ = [
    "Environment",
    "EpisodeStats",
    "ParsedCalls",
    "Tool",
    "ToolCall",
    "ToolCallParser",
    "ToolEnvironment",
    "ToolError",
    "Turn",
]
