"""Templates whose rendering of a message depends on what follows it (Qwen3-style reasoning handling).

Every assistant reply must carry loss, the final one exactly as the full rendering shows it, and the
encoding must stay equal to ``apply_chat_template``. The templates are our own jinja in Qwen3's style
(tests/chat_templates/qwen3*.jinja): ``qwen3`` keeps reasoning only after the last user query and
gives the last reply a think block; ``qwen3_latest_reply`` keeps it only for the latest reply, so the
conversation before the final reply renders differently on its own (the case issue #18 reported:
"cannot be located; it is not trained").
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from lmforge.model.builtin import TOKENIZER_DIR  # noqa: E402
from lmforge.template import get_template, jinja  # noqa: E402
from test_template_conformance import labelled_runs  # noqa: E402

TEMPLATE_DIR = Path(__file__).parent / "chat_templates"

THINK = [{"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n4"},
         {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "<think>\nThree plus three.\n</think>\n\n6"}]
PLAIN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
TOOLS = [{"role": "user", "content": "Add 2 and 3"},
         {"role": "tool_call", "content": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
         {"role": "tool_response", "content": "5"},
         {"role": "assistant", "content": "It is 5."}]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'


@pytest.fixture(scope="module")
def base_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _tok(base, name: str):
    tok = copy.deepcopy(base)
    tok.chat_template = (TEMPLATE_DIR / f"{name}.jinja").read_text()
    return tok


def _jinja_messages(messages):
    """The messages as the chat template sees them (a tool_call row becomes an assistant turn with tool_calls)."""
    out = []
    for m in messages:
        if m["role"] == "tool_call":
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]})
        elif m["role"] == "tool_response":
            out.append({"role": "tool", "content": m["content"]})
        else:
            out.append(m)
    return out


def _encode(tok, messages, caplog, **kw):
    jinja._warned.clear()
    with caplog.at_level(logging.WARNING, logger="lmforge.template"):
        enc = get_template(tok, **kw).encode({"messages": messages})
    rendered = tok.apply_chat_template(_jinja_messages(messages), tokenize=True,
                                       enable_thinking=kw.get("enable_thinking"))["input_ids"]
    assert enc["input_ids"] == rendered
    return enc, [r.getMessage() for r in caplog.records]


CASES = {"think": (THINK, ["4<|im_end|>", "<think>\nThree plus three.\n</think>\n\n6<|im_end|>"]),
         "plain": (PLAIN, ["Hello<|im_end|>", "<think>\n\n</think>\n\n4<|im_end|>"]),
         "tools": (TOOLS, [CALL, "<think>\n\n</think>\n\nIt is 5.<|im_end|>"])}


@pytest.mark.parametrize("name,case", [("qwen3", c) for c in CASES] + [("qwen3_latest_reply", "think"),
                                                                       ("qwen3_latest_reply", "plain")])
def test_every_reply_is_trained_the_final_one_as_rendered(base_tokenizer, caplog, name, case):
    conv, want = CASES[case]
    tok = _tok(base_tokenizer, name)
    enc, warnings = _encode(tok, conv, caplog)
    assert labelled_runs(tok, enc) == want
    assert not any("not trained" in w for w in warnings), warnings
    text = tok.decode(enc["input_ids"])
    assert "Two plus two" not in text  # earlier reasoning is dropped in the full rendering: it cannot train


def test_latest_reply_template_locates_the_final_reply_by_its_header(base_tokenizer, caplog):
    """Before the fix this reply was "cannot be located; it is not trained" (the context renders the earlier
    reply with its think block, the full conversation without)."""
    tok = _tok(base_tokenizer, "qwen3_latest_reply")
    template = get_template(tok)
    assert template.assistant_header == "<|im_start|>assistant\n"  # probed on a reply that is not the latest
    _, warnings = _encode(tok, THINK, caplog)
    assert any("found by its assistant header" in w for w in warnings)


def test_qwen3_tool_call_turn_is_trained_whole(base_tokenizer, caplog):
    """A tool call has empty content: the old "only what follows differs" rule matched one shared character and
    trained the single token ``<tool_call>``."""
    tok = _tok(base_tokenizer, "qwen3")
    enc, _ = _encode(tok, TOOLS, caplog)
    assert labelled_runs(tok, enc)[0] == CALL


@pytest.mark.parametrize("enable_thinking,want", [
    (False, ["4<|im_end|>", "<think>\nThree plus three.\n</think>\n\n6<|im_end|>"]),
    (True, ["4<|im_end|>", "<think>\nThree plus three.\n</think>\n\n6<|im_end|>"]),
])
def test_empty_think_prompt_labels_start_after_the_header(base_tokenizer, caplog, enable_thinking, want):
    """enable_thinking false opens an empty think block in the generation prompt; a final reply with reasoning is
    labelled from its own think block (the parting point used to cut it to ``Three plus three...``)."""
    tok = _tok(base_tokenizer, "qwen3")
    enc, _ = _encode(tok, THINK, caplog, enable_thinking=enable_thinking)
    assert labelled_runs(tok, enc) == want
    plain_final = [*THINK[:3], {"role": "assistant", "content": "6"}]
    enc, _ = _encode(tok, plain_final, caplog, enable_thinking=False)
    assert labelled_runs(tok, enc)[-1] == "6<|im_end|>"  # the prompt's empty think block is prompt, as at inference


SYSTEM_ON_LAST_USER = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + m.content + (' [be brief]' if loop.index0 == ns.last else '') + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_earlier_replies_are_trained_when_their_context_moves(base_tokenizer, caplog):
    """A template that decorates the last user turn: every earlier reply's context renders differently on its own."""
    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = SYSTEM_ON_LAST_USER
    conv = [*PLAIN, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    enc, warnings = _encode(tok, conv, caplog)
    assert labelled_runs(tok, enc) == ["Hello<|im_end|>", "4<|im_end|>", "6<|im_end|>"]
    assert not any("not trained" in w for w in warnings)
