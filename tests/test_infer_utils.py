"""Pieces of the inference path that need no model: request conversion, stop strings, streaming
detokenization, token bytes and checkpoint resolution."""
from __future__ import annotations

import json

import pytest

from lmforge.infer.convert import parse_request, to_canonical_row
from lmforge.infer.errors import InferRequestError, PromptTooLongError
from lmforge.infer.utils import IncrementalDecoder, StopStrings, TokenPieces


# ---- request -> canonical row -------------------------------------------------------------------

def test_tool_calls_and_tool_role_become_canonical():
    row = to_canonical_row({
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "content": "rain"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
    })
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system", "user", "assistant", "tool_call", "tool_call", "tool_response", "tool_response"]
    assert json.loads(row["messages"][3]["content"]) == {"name": "weather", "arguments": {"city": "Paris"}}
    assert row["messages"][5] == {"role": "tool_response", "content": "sunny"}
    assert row["tools"][0]["function"]["name"] == "weather"


def test_text_parts_are_joined_and_other_parts_rejected():
    row = to_canonical_row({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}]})
    assert row["messages"][0]["content"] == "a\nb"
    with pytest.raises(InferRequestError, match="image_url"):
        to_canonical_row({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})


@pytest.mark.parametrize("messages, match", [
    ([], "must not be empty"),
    ([{"role": "robot", "content": "beep"}], r"messages\.0\.role.*got 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message is from 'assistant'"),
    ([{"role": "user"}], "has no content"),
])
def test_bad_requests_fail_clearly(messages, match):
    with pytest.raises(InferRequestError, match=match) as info:
        to_canonical_row({"messages": messages}, index=3)
    assert info.value.index == 3 and str(info.value).startswith("request 3: ")


def test_errors_are_value_errors_with_numbers():
    e = PromptTooLongError(1200, 1024, index=1)
    assert isinstance(e, ValueError) and "1200" in str(e) and "1024" in str(e)
    assert parse_request({"messages": [{"role": "user", "content": "x"}]}).messages[0].content == "x"


# ---- stop strings and the streaming decoder -----------------------------------------------------

def test_stop_strings_find_earliest_and_partial():
    stop = StopStrings(["END", "##", ""])
    assert stop.stops == ["END", "##"]
    assert stop.cut("abc ## x END") == ("abc ", True)
    assert stop.cut("abc") == ("abc", False)
    assert stop.partial_len("hello EN") == 2 and stop.partial_len("hello #") == 1 and stop.partial_len("x") == 0
    assert not StopStrings([])


def test_decoder_never_splits_a_character(tiny_tokenizer):
    text = "你好，世界! héllo 😀 done"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters really are split over tokens
    dec = IncrementalDecoder(lambda t: tiny_tokenizer.decode(t))
    deltas = [dec.push([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + dec.finish(text) == text and dec.finish(text) == ""


def test_decoder_holds_back_a_possible_stop_string(tiny_tokenizer):
    text = "one two STOP three"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(lambda t: tiny_tokenizer.decode(t), StopStrings(["STOP"]))
    out = ""
    for i in ids:
        out += dec.push([i])
        assert "S" not in out  # nothing of the stop string leaks out, even partially
    assert dec.stopped and out == "one two "


def test_token_bytes_are_exact_for_partial_characters(tiny_tokenizer):
    pieces = TokenPieces(tiny_tokenizer)
    ids = tiny_tokenizer.encode("😀", add_special_tokens=False)
    assert b"".join(bytes(pieces(i)[1]) for i in ids) == "😀".encode()
    assert pieces(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")) == ("<|im_end|>", list(b"<|im_end|>"))


# ---- checkpoints --------------------------------------------------------------------------------

def _fake_adapter(path, base="some/base"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return path


def test_resolve_checkpoint_reads_args_json(tmp_path):
    from lmforge.infer.checkpoint import parse_adapters, resolve_model_source

    run = tmp_path / "run"
    ckpt = _fake_adapter(run / "checkpoint-5")
    (run / "args.json").write_text(json.dumps({"model": "builtin:tiny", "template": "chatml", "system": "S"}))
    src = resolve_model_source(ckpt_dir=str(ckpt))
    assert (src.model, src.template, src.system) == ("builtin:tiny", "chatml", "S")
    assert src.adapters == {"checkpoint-5": str(ckpt)}
    # user values win; adapters alone find their base through args.json
    assert resolve_model_source(ckpt_dir=str(ckpt), system="mine").system == "mine"
    assert resolve_model_source(adapters=[str(ckpt)]).model == "builtin:tiny"
    other = _fake_adapter(tmp_path / "x" / "checkpoint-5")
    names = list(parse_adapters([str(ckpt), str(other), f"named={other}"]))
    assert names == ["checkpoint-5", "checkpoint-5-2", "named"]
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter"):
        parse_adapters([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model_source(ckpt_dir=str(tmp_path))
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    assert resolve_model_source("ignored", ckpt_dir=str(full)).model == str(full)


@pytest.mark.parametrize("source", ["text", "random"])
def test_windowed_decoder_sends_what_the_whole_reply_decoder_sends(tiny_tokenizer, source):
    """The server's decoder decodes only new tokens (plus a little context); its pieces must not change."""
    import random

    from lmforge.template import get_template

    tpl = get_template(tiny_tokenizer, "chatml")  # decode cuts at stop tokens and strips trailing stop words
    rng = random.Random(0)
    specials = set(tpl.stop_token_ids) | {tiny_tokenizer.pad_token_id}
    windowed = 0
    for trial in range(30):
        if source == "text":
            text = "你好，世界! héllo 😀 done. " * rng.randint(1, 4) + "<|im_end|> tail"
            ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(rng.randint(5, 120))]
        ids = [i for i in ids if i not in specials] if trial % 2 else ids
        plain = IncrementalDecoder(tpl.decode, StopStrings(["xyz"]))
        window = IncrementalDecoder(tpl.decode, StopStrings(["xyz"]), window=True, hold_ids=specials)
        k = 0
        while k < len(ids):
            step = ids[k:k + rng.randint(1, 5)]
            k += len(step)
            assert window.push(step) == plain.push(step)
        final = tpl.decode(ids)
        assert window.finish(final) == plain.finish(final)
        assert window.sent == plain.sent
        windowed += window._window and window._anchor > 0
    assert windowed >= 10  # the window was really used, not given up at once
