"""Row formats: check fields and turn each row into text segments, each marked as scored or not.

Segments are tokenised one by one and concatenated (see tokenize.py), so the prompt's tokens are a true prefix
of the whole sequence even when a tokenizer would merge characters across the prompt/response boundary.
"""

from __future__ import annotations

from lightning_align.data.sources import DataError, Row

Segments = list[tuple[str, bool]]  # (text, scored)
CHAT_ROLES = ("system", "user", "assistant", "tool")


def text_field(row: Row, field: str, allow_empty: bool = False) -> str:
    if field not in row.fields:
        present = ", ".join(sorted(row.fields)) or "none"
        raise DataError(f"{row.where()}: missing field '{field}' (fields present: {present})")
    value = row.fields[field]
    if not isinstance(value, str):
        raise DataError(f"{row.where(field)}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where(field)}: is empty; every row needs a non-empty '{field}'")
    return value


def chat_messages(row: Row, field: str) -> list[dict]:
    """A row's message list, checked: roles, string contents, and tool calls as TRL and OpenAI write them
    (an assistant message with `tool_calls` [{"type": "function", "function": {"name", "arguments"}}], its
    content possibly empty, then `tool` messages with the results)."""
    messages = row.fields.get(field)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where(field)}: expected a non-empty list of {{'role', 'content'}} messages")
    for i, message in enumerate(messages):
        where = row.where(f"{field}[{i}]")
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: expected an object with string 'role' and 'content'")
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: unknown role '{message['role']}'; roles are {', '.join(CHAT_ROLES)}")
        calls = message.get("tool_calls")
        if calls is not None:
            check_tool_calls(calls, message["role"], where)
        content = message.get("content")
        if calls and content is None:
            content = message["content"] = ""
        if not isinstance(content, str):
            raise DataError(f"{where}: 'content' must be a string, got {type(content).__name__}")
        if message["role"] == "assistant" and not content.strip() and not calls:
            raise DataError(f"{where}: assistant message is empty")
    return messages


def check_tool_calls(calls, role: str, where: str) -> None:
    if role != "assistant":
        raise DataError(f"{where}: only assistant messages make tool calls, not {role!r} ones")
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: 'tool_calls' must be a non-empty list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(
                f"{where}.tool_calls[{j}]: expected {{'type': 'function', 'function': {{'name': ..., 'arguments': "
                "{...}}}}}"
            )
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise DataError(f"{where}.tool_calls[{j}].function.arguments: expected an object (or a JSON string)")


def row_tools(row: Row) -> list[dict] | None:
    """The row's `tools` field (JSON schemas of the functions the template lists to the model), if any."""
    tools = row.fields.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{row.where('tools')}: expected a list of function schemas (objects)")
    return tools


def render_chat(messages: list[dict], tokenizer, row: Row, scored_from: int = 0) -> Segments:
    """Split a rendered chat into segments: each assistant reply from message `scored_from` on is scored (its tool
    calls included), everything else not (tool results among it).

    Renders every prefix of the conversation with the tokenizer's own template, so any template works: the
    reply is the text the template adds after the generation prompt, up to and including its first end-of-turn
    token (Llama 3's <|eot_id|>, ChatML's <|im_end|>, Gemma's <end_of_turn>, Phi-3's <|end|>, EOS); what a
    template writes after that (a newline, a closing EOS) is not scored, so each reply scores one end of turn.
    """
    segments: Segments = []
    done = ""
    tools = row_tools(row)
    render = {"tools": tools} if tools else {}
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < scored_from:
            continue
        if not any(m["role"] in ("user", "system", "tool") for m in messages[:i]):
            raise DataError(
                f"{row.where(f'messages[{i}]')}: the conversation starts with an assistant turn; a reply needs a "
                "user (or system) message before it"
            )
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **render)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **render)
        if not before.startswith(done) or not through.startswith(before):
            raise DataError(
                f"{row.where()}: the chat template does not render this conversation as a sequence of growing "
                "prefixes, so assistant replies cannot be located; use prompt/completion rows instead"
            )
        reply = through[len(before) :]
        if message.get("tool_calls"):
            reply = reply[: tool_call_turn_end(reply, tokenizer, message, row, i)]
        else:
            reply = reply[: turn_end(reply, tokenizer, message["content"])]
        segments += [(before[len(done) :], False), (reply, True)]
        done = before + reply
    if not segments:
        raise DataError(f"{row.where()}: the conversation has no assistant message to train on")
    return [(text, scored) for text, scored in segments if text]


def turn_end(reply: str, tokenizer, content: str) -> int:
    """Where a rendered reply's turn ends: just after the first special token after its content that is not BOS,
    padding or unknown (the template's end-of-turn marker or EOS), or the reply's end if it has none."""
    starters = {tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token} - {tokenizer.eos_token}
    core = content.strip()
    after = reply.find(core) + len(core) if core and core in reply else 0  # templates may trim the content
    ends = [
        reply.find(token, after) + len(token)
        for token in tokenizer.all_special_tokens
        if token and token not in starters and token in reply[after:]
    ]
    return min(ends, default=len(reply))


def tool_call_turn_end(reply: str, tokenizer, message: dict, row: Row, index: int) -> int:
    """Where a rendered reply with tool calls ends: after the end-of-turn marker the template closes a plain
    assistant reply with (found by rendering one), after every call's name; the whole reply if it has none."""
    names = [call["function"]["name"] for call in message["tool_calls"]]
    missing = [name for name in names if name not in reply]
    if missing:
        raise DataError(
            f"{row.where(f'messages[{index}]')}: the chat template does not render this message's tool calls "
            f"({', '.join(missing)} is not in its text); pass chat_template='...' with one that renders "
            "'tool_calls' (and 'tool' turns)"
        )
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "QZXJ"}]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = rendered[rendered.find("QZXJ") :]
    marker = tail[4 : turn_end(tail, tokenizer, "QZXJ")].strip()
    after = max(reply.rfind(name) + len(name) for name in names)
    end = reply.find(marker, after) if marker else -1
    return len(reply) if end < 0 else end + len(marker)


def sft_segments(row: Row, tokenizer) -> Segments:
    """Segments of an SFT row: `{"messages": [...]}` chat rows, or `{"prompt", "completion"}` plain-text rows."""
    if "messages" in row.fields:
        both = [field for field in ("prompt", "completion") if field in row.fields]
        if both:
            raise DataError(
                f"{row.where()}: has both 'messages' and {' and '.join(repr(f) for f in both)}; a row is either a "
                "chat ('messages') or prompt/completion text: remove one"
            )
        messages = chat_messages(row, "messages")
        if messages[-1]["role"] != "assistant" and any(m["role"] == "assistant" for m in messages):
            raise DataError(
                f"{row.where(f'messages[{len(messages) - 1}]')}: the conversation ends with a "
                f"{messages[-1]['role']} turn, which trains nothing; end it with the assistant's reply or drop the turn"
            )
        return render_chat(messages, tokenizer, row)
    if "prompt" not in row.fields and "completion" not in row.fields:
        raise DataError(
            f"{row.where()}: expected 'prompt' and 'completion' fields, or 'messages'; "
            f"got {', '.join(sorted(row.fields)) or 'no fields'}"
        )
    prompt = text_field(row, "prompt", allow_empty=True)
    return [(prompt, False), (text_field(row, "completion"), True)]


def chat_template_check(tokenizer, tokenizer_name: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"tokenizer '{tokenizer_name}' has no chat template, so 'messages' rows cannot be rendered; pass "
            "chat_template='...' (a Jinja template) to the DataModule, or use prompt/completion rows"
        )


def preference_segments(row: Row, tokenizer) -> tuple[Segments, Segments, Segments]:
    """(prompt, chosen, rejected) segments of a preference row.

    Plain rows have text fields; chat rows have a `prompt` message list and `chosen` / `rejected` lists of the
    assistant's messages that follow it.
    """
    for field in ("prompt", "chosen", "rejected"):
        if field not in row.fields:
            present = ", ".join(sorted(row.fields)) or "none"
            raise DataError(f"{row.where()}: missing field '{field}' (fields present: {present})")
    conversational = [field for field in ("prompt", "chosen", "rejected") if isinstance(row.fields[field], list)]
    if conversational and len(conversational) < 3:
        plain = next(f for f in ("chosen", "rejected", "prompt") if f not in conversational)
        raise DataError(
            f"{row.where(plain)}: a {type(row.fields[plain]).__name__}, but {' and '.join(map(repr, conversational))} "
            f"{'is a list' if len(conversational) == 1 else 'are lists'} of messages; in a conversational row all "
            "three are message lists (chosen / rejected: the assistant's reply, "
            '[{"role": "assistant", "content": "..."}]), in a plain one all three are strings'
        )
    if conversational:
        prompt = chat_messages(row, "prompt")
        sides = {side: completion_messages(row, side, prompt) for side in ("chosen", "rejected")}
        chosen, rejected = (
            render_chat(prompt + sides[side], tokenizer, row, scored_from=len(prompt))
            for side in ("chosen", "rejected")
        )
        # Both renderings open with the same unscored text: the prompt and the generation prompt.
        if chosen[0] != rejected[0] or chosen[0][1]:
            raise DataError(f"{row.where()}: the chat template renders the prompt differently before each response")
        return [chosen[0]], chosen[1:], rejected[1:]
    prompt = text_field(row, "prompt", allow_empty=True)
    return [(prompt, False)], [(text_field(row, "chosen"), True)], [(text_field(row, "rejected"), True)]


def completion_messages(row: Row, field: str, prompt: list[dict]) -> list[dict]:
    """The messages of a conversational row's response field, refused if they repeat the prompt's turns (TRL's
    implicit-prompt rows turned explicit without cutting the prompt from each response)."""
    messages = chat_messages(row, field)
    if messages[: len(prompt)] == prompt or messages[0]["role"] != "assistant":
        raise DataError(
            f"{row.where(field)}: starts with a {messages[0]['role']} turn"
            + (", repeating the prompt's turns" if messages[: len(prompt)] == prompt else "")
            + f"; with a separate 'prompt', '{field}' holds only what follows it (the assistant's reply). Drop the "
            "repeated turns, or drop 'prompt' and give whole conversations as 'messages' rows"
        )
    return messages
