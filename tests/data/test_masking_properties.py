"""Property-based: for any prompt and response text, the scored positions are exactly the response tokens (and
its one EOS), the prompt is a token prefix, and nothing but a `DataError` can come out of bad text."""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_align.data import DataError
from lightning_align.data.sources import Row
from lightning_align.data.tokenize import IGNORE_INDEX, encode_segments, end_of_turn_ids
from lightning_align.demos.tiny import CHARACTERS, build_tokenizer

TOKENIZER = build_tokenizer()
text = st.text(alphabet=CHARACTERS, max_size=40)  # the demo tokenizer's characters: others decode as <unk>
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(prompt=text, response=text)
@example(prompt="0", response="<|assistant|>")  # a role marker is no end of turn: EOS still follows
@example(prompt="0", response="done</s>")  # an EOS of the text's own is not doubled
def test_plain_rows_score_exactly_the_response_and_one_eos(prompt, response):
    row = Row("<property>", 1, {"prompt": prompt, "completion": response})
    try:
        ids, labels = encode_segments([(prompt, False), (response, True)], TOKENIZER, row, add_bos=True)
    except DataError:
        prompt_ids = TOKENIZER(prompt, add_special_tokens=False).input_ids
        response_ids = TOKENIZER(response, add_special_tokens=False).input_ids
        assert not prompt_ids or not response_ids  # refused only when one side is empty
        return
    prompt_ids = [TOKENIZER.bos_token_id] + TOKENIZER(prompt, add_special_tokens=False).input_ids
    response_ids = TOKENIZER(response, add_special_tokens=False).input_ids
    if not response_ids or response_ids[-1] not in end_of_turn_ids(TOKENIZER):
        response_ids.append(TOKENIZER.eos_token_id)
    assert response_ids[-1] == TOKENIZER.eos_token_id  # the tiny template's end of turn is EOS
    assert ids == prompt_ids + response_ids
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert ids.count(TOKENIZER.bos_token_id) == 1 + response_ids.count(TOKENIZER.bos_token_id)


@SETTINGS
@given(user=text, reply=text)
def test_chat_rows_score_exactly_the_assistant_reply(user, reply):
    from lightning_align.data.formats import sft_segments

    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    row = Row("<property>", 1, {"messages": messages})
    try:
        segments = sft_segments(row, TOKENIZER)
        ids, labels = encode_segments(segments, TOKENIZER, row, add_bos=False)
    except DataError:
        assert not reply.strip()  # refused only for an empty reply
        return
    rendered = TOKENIZER.apply_chat_template(messages, tokenize=False)
    assert TOKENIZER.decode(ids) == rendered
    scored = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert scored == TOKENIZER(reply, add_special_tokens=False).input_ids + [TOKENIZER.eos_token_id]
