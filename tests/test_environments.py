"""Tool-use environments: functions as tools with their schemas, the tool-call parser (default markers and a
configured pattern), and each way a tool fails named with the tool and the episode, handled as asked."""

import re
import time

import pytest

from lightning_align.environments import EpisodeStats, Tool, ToolCallParser, ToolEnvironment, ToolError


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def broken(x: int) -> str:
    """Always fails.

    Args:
        x: ignored
    """
    raise RuntimeError("disk on fire")


def slow(x: int) -> str:
    """Sleeps.

    Args:
        x: ignored
    """
    time.sleep(5)
    return "late"


def listing(x: int) -> list:
    """Returns a list.

    Args:
        x: ignored
    """
    return [x]


def exact_answer(row, messages):
    return float(messages[-1]["content"].strip() == row["answer"])


def test_a_function_becomes_a_tool_with_the_schema_templates_render():
    tool = Tool(add)
    assert tool.schema["function"]["name"] == "add"
    assert tool.schema["function"]["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "the first number",
    }
    assert tool({"a": 2, "b": 40}) == "42"


def test_the_parser_reads_calls_between_markers_and_counts_malformed_ones():
    parser = ToolCallParser()
    text = (
        'I will add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
        '<tool_call>{not json}</tool_call><tool_call>[1]</tool_call><tool_call>{"name": "add"'
    )
    parsed = parser.parse(text)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]
    assert len(parsed.malformed) == 3  # bad JSON, not an object, never closed
    assert parser.stop == "</tool_call>"


def test_a_configured_pattern_reads_other_formats_and_must_name_its_groups():
    parser = ToolCallParser(pattern=r"CALL (?P<name>\w+)\((?P<arguments>\{.*?\})\)")
    parsed = parser.parse('x CALL add({"a": 1, "b": 2}) y CALL add(oops)')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("add", {"a": 1, "b": 2})]
    with pytest.raises(ValueError, match="named groups"):
        ToolCallParser(pattern=r"CALL (\w+)")


def episode(environment, replies, row=None):
    """Play the policy's replies against the environment; the turns it answered."""
    environment.stats = EpisodeStats(episode=7)
    messages, turns = [{"role": "user", "content": "12+30?"}], []
    for reply in replies:
        messages.append({"role": "assistant", "content": reply})
        turn = environment.step(row or {"answer": "42"}, messages, [], environment.stats)
        turns.append(turn)
        messages += turn.messages
        if turn.done:
            break
    return turns, messages


CALL = '<tool_call>{"name": "%s", "arguments": {"%s": 12, "b": 30}}</tool_call>'


def test_a_tool_episode_appends_results_and_ends_with_the_answer_scored():
    environment = ToolEnvironment([add], reward=exact_answer)
    turns, messages = episode(environment, [CALL % ("add", "a"), "42"])
    assert [t.done for t in turns] == [False, True] and turns[-1].reward == 1.0
    assert messages[2] == {"role": "tool", "name": "add", "content": "42"}
    assert (environment.stats.turns, environment.stats.tool_calls, environment.stats.malformed_calls) == (2, 1, 0)
    assert environment.schemas == [Tool(add).schema]


@pytest.mark.parametrize(
    "tools, call, message",
    [
        ([broken], CALL % ("broken", "x"), "tool 'broken' in episode 7 raised TypeError"),  # wrong arguments
        ([broken], '<tool_call>{"name": "broken", "arguments": {"x": 1}}</tool_call>', "raised RuntimeError: disk"),
        ([Tool(slow, timeout=0.2)], '<tool_call>{"name": "slow", "arguments": {"x": 1}}</tool_call>', "within 0.2 s"),
        (
            [listing],
            '<tool_call>{"name": "listing", "arguments": {"x": 1}}</tool_call>',
            r"returned list \[1\], not text",
        ),
        ([add], CALL % ("mul", "a"), "episode 7 called unknown tool 'mul' \\(tools: add\\)"),
    ],
)
def test_failing_tools_end_the_episode_with_a_penalty_or_stop_the_run(tools, call, message):
    environment = ToolEnvironment(tools, reward=exact_answer, error_penalty=-0.5)
    turns, _ = episode(environment, [call, "42"])
    assert len(turns) == 1 and turns[0].done and turns[0].reward == -0.5
    assert len(environment.stats.tool_errors) == 1
    assert re.search(message, environment.stats.tool_errors[0])
    with pytest.raises(ToolError, match=message):
        episode(ToolEnvironment(tools, reward=exact_answer, on_error="raise"), [call])
