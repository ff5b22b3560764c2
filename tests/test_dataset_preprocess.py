"""Every input format maps to the same canonical row; bad rows name the field."""
from __future__ import annotations

import json

import pytest

from lmforge.dataset import CANONICAL_COLUMNS, DatasetError, preprocess_row


def msg(role, content, loss=None):
    return {"role": role, "content": content, "loss": loss}


def canonical(messages=None, **kw):
    row = dict.fromkeys(CANONICAL_COLUMNS)
    row["messages"] = messages
    row.update(kw)
    return row


SYS, Q0, A0, Q, A = "Be brief.", "Hi", "Hello!", "What is 2 + 2?", "4"
# system + one earlier exchange + the question: what every chat format below says
CHAT = canonical([msg("system", SYS), msg("user", Q0), msg("assistant", A0), msg("user", Q), msg("assistant", A)])


def test_openai_messages():
    raw = {"messages": [{"role": "system", "content": SYS}, {"role": "user", "content": Q0},
                        {"role": "assistant", "content": A0}, {"role": "user", "content": Q},
                        {"role": "assistant", "content": A}]}
    assert preprocess_row(raw) == CHAT


def test_openai_content_parts_are_joined():
    raw = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                        {"role": "user", "content": [{"type": "text", "text": Q0}]},
                        {"role": "assistant", "content": A0}, {"role": "user", "content": Q},
                        {"role": "assistant", "content": [{"type": "text", "text": A}]}]}
    assert preprocess_row(raw) == CHAT


def test_sharegpt_conversations():
    raw = {"system": SYS, "conversations": [{"from": "human", "value": Q0}, {"from": "gpt", "value": A0},
                                            {"from": "human", "value": Q}, {"from": "gpt", "value": A}]}
    assert preprocess_row(raw) == CHAT
    # role/content keys inside conversations, system as a message
    raw = {"conversations": [{"role": "system", "content": SYS}, {"role": "user", "content": Q0},
                             {"role": "assistant", "content": A0}, {"role": "user", "content": Q},
                             {"role": "assistant", "content": A}]}
    assert preprocess_row(raw) == CHAT


def test_alpaca():
    raw = {"system": SYS, "instruction": "What is 2 + 2?", "input": "", "output": A, "history": [[Q0, A0]]}
    assert preprocess_row(raw) == CHAT
    with_input = preprocess_row({"instruction": "Add these.", "input": "2 2", "output": "4"})
    assert with_input["messages"] == [msg("user", "Add these.\n2 2"), msg("assistant", "4")]


def test_query_response():
    raw = {"system": SYS, "query": Q, "response": A, "history": [[Q0, A0]]}
    assert preprocess_row(raw) == CHAT


def test_prompt_completion():
    raw = {"prompt": Q, "completion": A}
    assert preprocess_row(raw) == canonical([msg("user", Q), msg("assistant", A)])
    # TRL conversational form, plus a KTO label
    raw = {"prompt": [{"role": "user", "content": Q}], "completion": [{"role": "assistant", "content": A}], "label": False}
    assert preprocess_row(raw) == canonical([msg("user", Q), msg("assistant", A)], label=False)


def test_preference_prompt_chosen_rejected():
    expected = canonical([msg("system", SYS), msg("user", Q), msg("assistant", A)], rejected_response="5")
    assert preprocess_row({"system": SYS, "prompt": Q, "chosen": A, "rejected": "5"}) == expected
    conversational = {
        "prompt": [{"role": "system", "content": SYS}, {"role": "user", "content": Q}],
        "chosen": [{"role": "assistant", "content": A}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    assert preprocess_row(conversational) == expected
    # implicit prompt: chosen and rejected hold whole conversations
    implicit = {
        "chosen": [{"role": "system", "content": SYS}, {"role": "user", "content": Q}, {"role": "assistant", "content": A}],
        "rejected": [{"role": "system", "content": SYS}, {"role": "user", "content": Q}, {"role": "assistant", "content": "5"}],
    }
    assert preprocess_row(implicit) == expected
    # the canonical preference row maps to itself
    assert preprocess_row(expected) == expected


def test_text_for_pretraining():
    assert preprocess_row({"text": "Once upon a time."}) == canonical(text="Once upon a time.")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_ROW = canonical(
    [msg("user", "Weather in Paris and Rome?"),
     msg("tool_call", json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})),
     msg("tool_call", json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})),
     msg("tool_response", '{"temp": 21}'),
     msg("tool_response", "18 C"),
     msg("assistant", "Paris 21 C, Rome 18 C.")],
    tools=json.dumps(TOOLS),
)


def test_openai_tool_calls():
    raw = {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ]},
            {"role": "tool", "tool_call_id": "1", "content": {"temp": 21}},
            {"role": "tool", "tool_call_id": "2", "content": "18 C"},
            {"role": "assistant", "content": "Paris 21 C, Rome 18 C."},
        ],
    }
    assert preprocess_row(raw) == TOOL_ROW


def test_sharegpt_function_call_and_observation():
    raw = {
        "tools": json.dumps(TOOLS),  # tools given as a JSON string
        "conversations": [
            {"from": "human", "value": "Weather in Paris and Rome?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "observation", "value": "18 C"},
            {"from": "gpt", "value": "Paris 21 C, Rome 18 C."},
        ],
    }
    assert preprocess_row(raw) == TOOL_ROW


def _png(path):
    from PIL import Image

    Image.new("RGB", (4, 3), (9, 9, 9)).save(path)
    return str(path)


def test_canonical_rows_map_to_themselves(tmp_path):
    image = _png(tmp_path / "a.png")
    for row in (CHAT, TOOL_ROW, canonical(text="abc"), {**CHAT, "solution": "4", "images": [image]}):
        assert preprocess_row(row) == row


def test_extra_columns_pass_through_and_columns_rename():
    raw = {"q": Q, "a": A, "solution": "4", "meta": {"k": [1, 2]}}
    out = preprocess_row(raw, columns={"q": "query", "a": "response"})
    assert out == canonical([msg("user", Q), msg("assistant", A)], solution="4", meta={"k": [1, 2]})


def test_images_and_image_parts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    raw = {"messages": [{"role": "user", "content": [{"type": "text", "text": "<image>"},
                                                      {"type": "image_url", "image_url": {"url": "b.png"}},
                                                      {"type": "text", "text": "What is this?"}]},
                        {"role": "assistant", "content": "A cat."}],
           "images": "a.png"}
    out = preprocess_row(raw)
    assert out["images"] == [a, b]  # the images column first, then the content parts' images
    assert out["messages"][0]["content"] == "<image><image>What is this?"


def test_loss_and_weight():
    raw = {"messages": [{"role": "user", "content": Q0}, {"role": "assistant", "content": A0, "weight": 0},
                        {"role": "user", "content": Q}, {"role": "assistant", "content": A, "loss": True}]}
    assert [m["loss"] for m in preprocess_row(raw)["messages"]] == [None, False, None, True]


@pytest.mark.parametrize(
    "raw, field, needle",
    [
        ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, "messages[1].role", "unknown role 'bot'"),
        ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value", "expected a string"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing content"),
        ({"instruction": "x", "output": None, "query": None}, None, "cannot detect the format"),
        ({"query": "q", "response": "r", "history": [["only one"]]}, "history[0]", "pair"),
        ({"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "u"}]}, "rejected", "end with an assistant"),
        ({"text": "t", "tools": "{not json"}, "tools", "not JSON"),
        ({"text": "t", "label": "maybe"}, "label", "expected true/false"),
    ],
)
def test_errors_name_source_and_field(raw, field, needle):
    with pytest.raises(DatasetError) as err:
        preprocess_row(raw, source="data.jsonl:17")
    assert str(err.value).startswith("data.jsonl:17: ")
    assert needle in str(err.value)
    assert err.value.field == field
    if field:
        assert f"field {field!r}" in str(err.value)


def test_unknown_format_lists_columns_and_formats():
    with pytest.raises(DatasetError, match=r"columns are \['bar', 'foo'\]; expected one of: messages, conversations.*--columns"):
        preprocess_row({"foo": 1, "bar": 2}, source="data.jsonl:9")
