"""Template engine behaviour on the built-in tokenizer (ChatML with tools): modes, loss scales,
truncation, tool-call conversion, decoding, cache keys and error messages."""
from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")

from lmforge.model.builtin import TOKENIZER_DIR  # noqa: E402
from lmforge.registry import LOSS_SCALES  # noqa: E402
from lmforge.template import IGNORE_INDEX, MaxLengthError, Template, TemplateError, get_template  # noqa: E402

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "8"}]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
TOOL_ROW = {"messages": [{"role": "user", "content": "Weather in Paris and Rome?"},
                         {"role": "assistant", "content": "Let me check."},
                         {"role": "tool_call", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                         {"role": "tool_call", "content": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'},
                         {"role": "tool_response", "content": "sunny"},
                         {"role": "tool_response", "content": "rainy"},
                         {"role": "assistant", "content": "Paris is sunny, Rome is rainy."}],
            "tools": json.dumps(TOOLS)}


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture
def template(tok):
    return get_template(tok)


def runs(tok, enc, key="labels"):
    out, cur = [], []
    for t, lab in zip(enc["input_ids"], enc[key]):
        if lab == IGNORE_INDEX:
            if cur:
                out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(tok.decode(cur))
    return out


# ------------------------------------------------------------------------------------ loss scale

def test_loss_scale_strategies(tok):
    default = get_template(tok).encode({"messages": CONV})
    assert runs(tok, default) == ["5<|im_end|>", "8<|im_end|>"]
    last = get_template(tok, loss_scale="last_round").encode({"messages": CONV})
    assert runs(tok, last) == ["8<|im_end|>"]
    everything = get_template(tok, loss_scale="all").encode({"messages": CONV})
    assert everything["labels"] == everything["input_ids"]
    assert everything["input_ids"] == default["input_ids"] == last["input_ids"]
    assert default["loss_scale"] is None and everything["loss_scale"] is None


def test_per_message_loss_overrides_strategy(tok):
    msgs = copy.deepcopy(CONV)
    msgs[1]["loss"] = True   # a user message trained too
    msgs[4]["loss"] = False  # the last reply not trained
    enc = get_template(tok).encode({"messages": msgs})
    assert runs(tok, enc) == ["<|im_start|>user\nWhat is 2+3?<|im_end|>", "5<|im_end|>"]
    msgs = copy.deepcopy(CONV)
    msgs[2]["loss"] = True
    assert runs(tok, get_template(tok, loss_scale="last_round").encode({"messages": msgs})) == \
        ["5<|im_end|>", "8<|im_end|>"]
    msgs[2]["loss"] = False
    enc = get_template(tok, loss_scale="all").encode({"messages": msgs})
    assert "5<|im_end|>" not in "".join(runs(tok, enc)) and runs(tok, enc)[-1].endswith("8<|im_end|>\n")


def test_last_round_includes_tool_calls_after_last_user(tok):
    enc = get_template(tok, loss_scale="last_round").encode(TOOL_ROW)
    assert len(runs(tok, enc)) == 2


def test_rule_loss_scale_from_json(tok, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"base": "default", "rules": [{"pattern": "answer", "weight": 2.0},
                                                               {"pattern": r"\d+", "regex": True, "weight": 0.5}]}))
    template = get_template(tok, loss_scale=str(rules))
    enc = template.encode({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "The answer is 42"}]})
    scale = enc["loss_scale"]
    assert scale is not None and len(scale) == len(enc["input_ids"])
    by_token = {tok.decode([t]): w for t, w, lab in zip(enc["input_ids"], scale, enc["labels"]) if lab != IGNORE_INDEX}
    assert any(w == 2.0 for k, w in by_token.items() if "answer" in k)
    assert by_token["4"] == 0.5 and by_token["<|im_end|>"] == 1.0
    assert all(w == 0 for w, lab in zip(scale, enc["labels"]) if lab == IGNORE_INDEX)


def test_ignore_empty_think(tok):
    template = get_template(tok, "qwen3", loss_scale="ignore_empty_think")
    enc = template.encode({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "4"}]})
    assert runs(tok, enc) == ["4<|im_end|>"]
    assert "ignore_empty_think" in LOSS_SCALES


# ------------------------------------------------------------------------------------ modes

def test_infer_mode(template, tok):
    template.set_mode("infer")
    enc = template.encode({"messages": CONV[:-1]})
    assert set(enc) == {"input_ids", "length"}
    assert tok.decode(enc["input_ids"]).endswith("<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(TemplateError, match="last message must be from the user"):
        template.encode({"messages": CONV})
    cont = template.encode({"messages": CONV[:-1] + [{"role": "assistant", "content": "The sum"}],
                            "continue_final_message": True})
    assert tok.decode(cont["input_ids"]).endswith("<|im_start|>assistant\nThe sum")


def test_infer_after_tool_response(template, tok):
    template.set_mode("infer")
    row = {"messages": TOOL_ROW["messages"][:-1], "tools": TOOL_ROW["tools"]}
    text = tok.decode(template.encode(row)["input_ids"])
    assert text.endswith("<tool_response>\nrainy\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_rlhf_mode(template, tok):
    template.set_mode("rlhf")
    enc = template.encode({"messages": CONV, "rejected_response": "9"})
    assert set(enc) == {"chosen_input_ids", "chosen_labels", "chosen_loss_scale", "rejected_input_ids",
                        "rejected_labels", "rejected_loss_scale", "length"}
    assert runs(tok, {"input_ids": enc["chosen_input_ids"], "labels": enc["chosen_labels"]})[-1] == "8<|im_end|>"
    assert runs(tok, {"input_ids": enc["rejected_input_ids"], "labels": enc["rejected_labels"]})[-1] == "9<|im_end|>"
    assert enc["chosen_input_ids"][:-3] == enc["rejected_input_ids"][:-3]
    assert enc["length"] == max(len(enc["chosen_input_ids"]), len(enc["rejected_input_ids"]))
    rejected = CONV[:-1] + [{"role": "assistant", "content": "I don't know, sorry."}]
    enc2 = template.encode({"messages": CONV, "rejected_messages": rejected})
    assert tok.decode(enc2["rejected_input_ids"]).endswith("I don't know, sorry.<|im_end|>\n")
    with pytest.raises(TemplateError, match="rejected_response"):
        template.encode({"messages": CONV})


def test_pt_mode(template, tok):
    template.set_mode("pt")
    enc = template.encode({"text": "Hello world"})
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert enc["labels"] == enc["input_ids"] and enc["length"] == len(enc["input_ids"])
    assert tok.decode(enc["input_ids"]) == "Hello world<|im_end|>"
    chat = template.encode({"messages": CONV})
    assert chat["labels"] == chat["input_ids"] == tok.apply_chat_template(CONV)["input_ids"]


def test_set_mode_rejects_unknown(template):
    with pytest.raises(ValueError, match="unknown template mode 'eval'"):
        template.set_mode("eval")


# ------------------------------------------------------------------------------------ truncation

@pytest.mark.parametrize("strategy", ["right", "left", "delete", "raise"])
def test_truncation(tok, strategy):
    full = get_template(tok).encode({"messages": CONV})
    template = get_template(tok, max_length=10, truncation_strategy=strategy)
    if strategy == "raise":
        with pytest.raises(MaxLengthError, match=f"length {full['length']} exceeds max_length 10"):
            template.encode({"messages": CONV})
        return
    enc = template.encode({"messages": CONV})
    if strategy == "delete":
        assert enc is None
        return
    cut = slice(0, 10) if strategy == "right" else slice(-10, None)
    assert enc["input_ids"] == full["input_ids"][cut] and enc["labels"] == full["labels"][cut]
    assert enc["length"] == 10
    # short rows are untouched
    assert get_template(tok, max_length=1000, truncation_strategy=strategy).encode({"messages": CONV}) == full


def test_infer_truncation_keeps_the_end(tok):
    template = get_template(tok, max_length=8, truncation_strategy="right")
    template.set_mode("infer")
    enc = template.encode({"messages": CONV[:-1]})
    assert tok.decode(enc["input_ids"]).endswith("<|im_start|>assistant\n") and enc["length"] == 8


def test_bad_truncation_strategy(tok):
    with pytest.raises(ValueError, match="truncation_strategy must be one of"):
        get_template(tok, truncation_strategy="middle")


# ------------------------------------------------------------------------------------ tools

def test_tool_calls_render_through_chatml_tools_branch(template, tok):
    enc = template.encode(TOOL_ROW)
    converted = [TOOL_ROW["messages"][0],
                 {"role": "assistant", "content": "Let me check.", "tool_calls": [
                     {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                     {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                 {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rainy"},
                 TOOL_ROW["messages"][-1]]
    assert enc["input_ids"] == tok.apply_chat_template(converted, tools=TOOLS)["input_ids"]
    text = template.render(TOOL_ROW["messages"], tools=TOOL_ROW["tools"])
    assert "<tools>\n" + json.dumps(TOOLS[0]) in text
    assert ('<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response><|im_end|>" in text
    assert runs(tok, enc) == [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Paris is sunny, Rome is rainy.<|im_end|>"]


def test_row_ending_with_tool_call_trains_the_call(template, tok):
    row = {"messages": TOOL_ROW["messages"][:3], "tools": TOOLS}
    assert runs(tok, template.encode(row)) == [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>']
    row["messages"] = [dict(m, loss=False) if m["role"] == "assistant" else m for m in row["messages"]]
    assert runs(tok, template.encode(row)) == []  # the call's own loss (None) does not re-enable the merged turn


def test_openai_style_messages_are_accepted(template, tok):
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}, "id": "c1"}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "1"},
            {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]}]
    enc = template.encode({"messages": msgs, "tools": TOOLS})
    assert runs(tok, enc)[-1] == "Sunny.<|im_end|>"
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in tok.decode(enc["input_ids"])


# ------------------------------------------------------------------------------------ decode & keys

def test_decode_and_stop_words(template, tok):
    assert template.stop_words == ["<|im_end|>"] and template.stop_token_ids == [tok.eos_token_id]
    reply = tok("Hello there", add_special_tokens=False)["input_ids"]
    assert template.decode(reply + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]) == "Hello there"
    assert template.decode(reply + [tok.pad_token_id]) == "Hello there"
    think = tok("<think>\nhmm\n</think>\n\nok", add_special_tokens=False)["input_ids"]
    assert template.decode(think) == "<think>\nhmm\n</think>\n\nok"  # special tokens kept for parsers
    text = template.safe_decode([IGNORE_INDEX] * 3 + reply + [10**6])
    assert text == "[-100 * 3]Hello there[1000000 * 1]"


def test_cache_key(tok):
    key = get_template(tok).cache_key()
    assert key == get_template(tok).cache_key()
    others = [get_template(tok, system="x"), get_template(tok, max_length=64), get_template(tok, "chatml"),
              get_template(tok, loss_scale="last_round"), get_template(tok, truncation_strategy="left")]
    assert len({key, *(t.cache_key() for t in others)}) == 1 + len(others)
    template = get_template(tok)
    template.set_mode("pt")
    assert template.cache_key() != key


def test_template_is_picklable(template):
    clone = pickle.loads(pickle.dumps(template))
    assert clone.encode({"messages": CONV}) == template.encode({"messages": CONV})


def test_tokenizer_without_chat_template_uses_default(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    template = get_template(bare)
    assert template.name == "default" and "### User:" in template.stop_words
    enc = template.encode({"messages": CONV})
    assert runs(bare, enc) == ["5<|im_end|>", "8<|im_end|>"]
    with pytest.raises(TemplateError, match="no chat template"):
        Template(bare)


def test_registered_templates_api(tok):
    for name in ("default", "chatml", "qwen", "qwen3", "llama3"):
        t = get_template(tok, name, max_length=512, system="sys")
        assert (t.name, t.tokenizer, t.max_length, t.system) == (name, tok, 512, "sys")
        assert runs(tok, t.encode({"messages": CONV}))[-1].endswith("8" + t.end_of_turn)
    with pytest.raises(TemplateError, match="unknown template 'qwen4'.*Did you mean"):
        get_template(tok, "qwen4")


# ------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("row, match", [
    ({"messages": []}, "empty messages"),
    ({}, "empty messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"messages\[0\] has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"must alternate.*messages\[1\] \(user\) cannot follow messages\[0\] \(user\)"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "cannot follow the start of the conversation"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"messages\[1\] is a system message; a system message may only come first"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool_call", "content": "{bad"}]},
     r"messages\[1\] \(tool_call\) content is not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool_call", "content": '{"args": 1}'}]},
     r"must be a JSON object with a 'name'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "[oops"},
     "tools is not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"}]}, "must end with an assistant message"),
    ({"messages": [{"role": "user", "content": "a", "loss": "yes"}]}, r"'loss' must be true, false or null"),
    ("not a row", "a row must be a dict"),
])
def test_error_messages(template, row, match):
    with pytest.raises(TemplateError, match=match):
        template.encode(row)


def test_unknown_loss_scale(tok):
    with pytest.raises(ValueError, match="unknown loss scale 'lastround'.*Did you mean 'last_round'"):
        get_template(tok, loss_scale="lastround")


def test_import_stays_cheap():
    code = ("import sys, lmforge, lmforge.template, lmforge.template.registered; "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decode_calls_the_tokenizers_library_directly_with_the_same_text():
    """Template.decode skips transformers' conversions around the fast tokenizer's own decode (a streamed reply
    decodes twice per chunk), only where transformers would add nothing: same text on random ids, special
    tokens included; a tokenizer that cleans up spaces keeps transformers' path."""
    import copy
    import random

    from lmforge.model import load_tokenizer
    from lmforge.model.builtin import TOKENIZER_DIR
    from lmforge.template import get_template
    from lmforge.template.base import raw_decoder

    tok = load_tokenizer(TOKENIZER_DIR)
    fast, slow = get_template(tok), get_template(tok)
    slow._raw_backend = None
    assert raw_decoder(tok) is tok._tokenizer
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 24))]
        assert fast.decode(ids) == slow.decode(ids)
    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True
    assert raw_decoder(cleaning) is None


def test_decode_strips_stops_and_padding_leaves_its_input_alone_and_follows_a_new_pad_token(tok):
    import numpy as np
    import torch

    template = get_template(copy.deepcopy(tok))
    text_ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    pad = template.tokenizer.pad_token_id
    ids = [*text_ids, pad, pad]
    want = tok.decode(text_ids)
    assert template.decode(ids) == want and ids == [*text_ids, pad, pad]  # the caller's list is not cut
    assert template.decode(np.array(ids)) == template.decode(torch.tensor(ids)) == want
    assert template.decode([np.int64(i) for i in ids]) == want
    assert template.decode([*text_ids, template.stop_token_ids[0], *text_ids]) == want
    # a pad token set after the first decode is the one stripped from then on
    new_pad = text_ids[-1]
    template.tokenizer.pad_token = template.tokenizer.convert_ids_to_tokens(new_pad)
    assert template.tokenizer.pad_token_id == new_pad
    assert template.decode(text_ids) == tok.decode(text_ids[:-1])
