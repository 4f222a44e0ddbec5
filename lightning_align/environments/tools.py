"""Tools for tool-using rollouts: plain Python functions (typed arguments, a docstring) described by the JSON
schema chat templates render, the parser that finds calls in generated text, and calls run under a timeout with
errors that name the tool and the episode."""

from __future__ import annotations

import importlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


class ToolError(Exception):
    """A tool failed: it raised, ran past its timeout, or returned something that is not text."""


@dataclass
class ToolCall:
    """One call found in generated text: the tool's name, its arguments and the text it was parsed from."""

    name: str
    arguments: dict
    text: str


@dataclass
class ParsedCalls:
    """The calls of one generated turn, and the spans that looked like calls but could not be read."""

    calls: list[ToolCall] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


class ToolCallParser:
    """Finds tool calls in a generated turn.

    By default a call is a JSON object {"name": ..., "arguments": {...}} between `start` and `end` markers
    (`<tool_call>` / `</tool_call>`, as Qwen, Hermes and the tiny demo template write them). `pattern` replaces
    that with a regular expression whose named groups `name` and `arguments` (a JSON object) make a call, for
    templates that write calls differently. Generation of a turn can stop at `stop` (the end marker).
    """

    def __init__(self, start: str = "<tool_call>", end: str = "</tool_call>", pattern: str | None = None):
        self.start, self.end = start, end
        self.pattern = re.compile(pattern, re.DOTALL) if pattern is not None else None
        if self.pattern is not None and not {"name", "arguments"} <= set(self.pattern.groupindex):
            raise ValueError(f"pattern {pattern!r} needs named groups (?P<name>...) and (?P<arguments>...)")

    @property
    def stop(self) -> str | None:
        return None if self.pattern is not None else self.end

    def parse(self, text: str) -> ParsedCalls:
        parsed = ParsedCalls()
        if self.pattern is not None:
            for match in self.pattern.finditer(text):
                self.add(parsed, match.group(0), match.group("name"), match.group("arguments"))
            return parsed
        for match in re.finditer(re.escape(self.start) + "(.*?)(" + re.escape(self.end) + "|$)", text, re.DOTALL):
            if not match.group(2):  # opened and never closed: the turn was cut
                parsed.malformed.append(match.group(0))
                continue
            try:
                value = json.loads(match.group(1))
            except json.JSONDecodeError:
                parsed.malformed.append(match.group(0))
                continue
            if not isinstance(value, dict):
                parsed.malformed.append(match.group(0))
                continue
            self.add(parsed, match.group(0), value.get("name"), value.get("arguments", {}))
        return parsed

    @staticmethod
    def add(parsed: ParsedCalls, text: str, name, arguments) -> None:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            parsed.malformed.append(text)
        else:
            parsed.calls.append(ToolCall(name, arguments, text))


def resolve_function(value: Callable | str, what: str) -> Callable:
    """A function given as itself or as its import path `"package.module:function"` (for YAML configs)."""
    if callable(value):
        return value
    module_name, _, name = str(value).partition(":")
    if not name:
        raise ValueError(f"{what} {value!r} is neither a function nor 'package.module:function'")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{what} {value!r} could not be imported: {error}") from None


class Tool:
    """A plain Python function offered to the policy as a tool.

    Its JSON schema (name, description and typed arguments, from the signature and the Google-style docstring,
    by `transformers.utils.get_json_schema`) is what chat templates render for the model. `timeout` seconds per
    call (the function runs in a daemon thread; one that hangs is abandoned, not killed).
    """

    def __init__(self, function: Callable | str, timeout: float = 10.0):
        from transformers.utils import get_json_schema

        function = resolve_function(function, "tool")
        self.function = function
        self.name = function.__name__
        self.timeout = timeout
        self.schema = get_json_schema(function)

    def __call__(self, arguments: dict, episode: int | str = "?") -> str:
        """The tool's result as text; `ToolError` naming the tool and the episode if it raises, hangs or returns
        something else than text (numbers are written as text: most calculators return them)."""
        outcome: dict = {}

        def run():
            try:
                outcome["value"] = self.function(**arguments)
            except BaseException as error:  # noqa: BLE001 - reported with the tool's name below
                outcome["error"] = error

        worker = threading.Thread(target=run, daemon=True, name=f"tool-{self.name}")
        worker.start()
        worker.join(self.timeout)
        where = f"tool {self.name!r} in episode {episode}"
        if worker.is_alive():
            raise ToolError(f"{where} did not return within {self.timeout:g} s")
        if "error" in outcome:
            error = outcome["error"]
            raise ToolError(f"{where} raised {type(error).__name__}: {error}") from error
        value = outcome["value"]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ToolError(f"{where} returned {type(value).__name__} {value!r:.80}, not text; return a string")
        return value if isinstance(value, str) else repr(value)
