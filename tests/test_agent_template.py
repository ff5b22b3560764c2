"""Agent templates: tools into the system prompt, labels on the calls and the final reply only,
parsing calls back out of generated text (malformed JSON included), loss-scale rules for agents,
streamed tool calls, and the built-in tool-calls dataset."""
from __future__ import annotations

import json

import pytest

from lmforge.registry import AGENT_TEMPLATES
from lmforge.template import IGNORE_INDEX, get_agent_template, get_template
from lmforge.template.loss_scale import get_loss_scale, rules_from_json

TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

ROW = {"tools": json.dumps(TOOLS), "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "tool_call", "content": '{"name": "weather", "arguments": {"city": "Paris"}}'},
    {"role": "tool_call", "content": {"name": "weather", "arguments": '{"city": "Rome"}'}},
    {"role": "tool_response", "content": "PARIS_RESULT 18 C"},
    {"role": "tool_response", "content": "ROME_RESULT 25 C"},
    {"role": "assistant", "content": "Paris 18 C, Rome 25 C."}]}

# What each template writes for the two calls (a substring of the labels).
CALL_TEXT = {
    "hermes": '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
              '{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>',
    "react_en": 'Action: weather\nAction Input: {"city": "Paris"}\nAction: weather\nAction Input: {"city": "Rome"}',
    "llama3": '{"name": "weather", "parameters": {"city": "Paris"}}\n{"name": "weather", "parameters": {"city": "Rome"}}',
    "glm4": 'weather\n{"city": "Paris"}\nweather\n{"city": "Rome"}',
    "mistral": '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris"}}, '
               '{"name": "weather", "arguments": {"city": "Rome"}}]',
}
NAMES = list(CALL_TEXT)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def test_registered_names():
    for name in [*NAMES, "qwen", "react", "llama3_json"]:
        assert name in AGENT_TEMPLATES
    with pytest.raises(ValueError, match="unknown agent template"):
        get_agent_template("hermez")


@pytest.mark.parametrize("name", NAMES)
def test_encode_tools_calls_and_labels(tok, name):
    tpl = get_template(tok, agent_template=name)
    assert tpl.agent_template.name == name and tpl.agent_render
    enc = tpl.encode(ROW)
    text = tpl.safe_decode(enc["input_ids"])
    labels = tpl.safe_decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    system = text[:text.index("Weather in Paris and Rome?")]
    # the tools and the row's system prompt are in the system text, before the question
    assert "Be brief." in system and "calculator" in system and "Weather in a city" in system
    # labels: exactly the calls turn and the final reply, with their end-of-turn markers
    assert labels == CALL_TEXT[name] + "<|im_end|>" + "Paris 18 C, Rome 25 C.<|im_end|>"
    # both tool results are in the prompt, in one message, and never trained
    assert "PARIS_RESULT" in text and "ROME_RESULT" in text and "RESULT" not in labels
    assert text.count("<|im_start|>user") == 2
    # the agent's rendering is what the chat template gets: the full text is the plain-message rendering
    assert tpl.render(ROW["messages"], ROW["tools"]) == text


@pytest.mark.parametrize("name", NAMES)
def test_parse_roundtrip_and_malformed(name):
    agent = get_agent_template(name)
    calls = [{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "calculator",
                                                                   "arguments": {"expression": "2 * 3"}}]
    text = agent.format_tool_calls(calls)
    content, parsed = agent.parse_tool_calls(text)
    assert parsed == calls and content == ""
    fns = agent.get_toolcall(text)
    assert [(f.name, json.loads(f.arguments)) for f in fns] == [(c["name"], c["arguments"]) for c in calls]
    # plain text: no calls, the text is the content
    assert agent.parse_tool_calls("It is 18 C in Paris.") == ("It is 18 C in Paris.", [])
    # malformed JSON (cut off, a bad key, not an object): no crash, no call, the text comes back
    good = agent.format_tool_calls(calls[:1])
    for bad in (good.replace('"Paris"}', '"Paris"'), good.replace('{"city"', "{city"), good.replace('"city"', "")):
        content, parsed = agent.parse_tool_calls(bad)
        assert parsed == [] and content == bad, (name, bad)
        assert agent.get_toolcall(bad) == []


def test_parse_keeps_text_around_calls():
    hermes = get_agent_template("hermes")
    content, calls = hermes.parse_tool_calls('Let me check.\n<tool_call>\n{"name": "weather", "arguments": '
                                             '{"city": "Oslo"}}\n</tool_call>')
    assert content == "Let me check." and calls == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    # one good and one malformed call: the good one is parsed, the bad one stays in the content
    content, calls = hermes.parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
                                             '<tool_call>{"name": "b", "arguments": {</tool_call>')
    assert [c["name"] for c in calls] == ["a"] and "<tool_call>{\"name\": \"b\"" in content
    react = get_agent_template("react_en")
    content, calls = react.parse_tool_calls('Thought: I need the weather.\nAction: weather\nAction Input: '
                                            '{"city": "Oslo"}\nObservation:')
    assert content == "Thought: I need the weather." and calls == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    assert react.parse_tool_calls("Thought: done\nFinal Answer: 4") == ("Thought: done\nFinal Answer: 4", [])
    llama = get_agent_template("llama3")
    assert llama.parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"x": 1}}')[1] == [
        {"name": "f", "arguments": {"x": 1}}]
    assert llama.parse_tool_calls('{"answer": 4}') == ('{"answer": 4}', [])  # JSON, but not a call


def test_stream_hold():
    hermes, llama = get_agent_template("hermes"), get_agent_template("llama3")
    assert hermes.stream_hold("Sure. <tool_call>\n{") == len("Sure. ")
    assert hermes.stream_hold("Sure. <tool_") == len("Sure. ")
    assert hermes.stream_hold("Sure.") == len("Sure.")
    assert llama.stream_hold(' {"name"') == 0 and llama.stream_hold("Hello") == 5


def test_default_agent_template(tok):
    # the built-in tokenizer's ChatML template renders tools itself (hermes style): kept, hermes parses
    native = get_template(tok)
    assert native.agent_template.name == "hermes" and not native.agent_render
    forced = get_template(tok, agent_template="hermes")
    assert forced.agent_render and forced.cache_key() != native.cache_key()
    # the registered 'default' template renders tools with <tool_call> too
    assert get_template(tok, "default").agent_template.name == "hermes"


def test_no_native_tools_uses_hermes_rendering(tok):
    from lmforge.template import Template

    plain = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    tpl = Template(tok, name="plain", chat_template=plain)
    assert tpl.agent_template.name == "hermes" and tpl.agent_render
    enc = tpl.encode(ROW)
    labels = tpl.safe_decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert labels.startswith(CALL_TEXT["hermes"])
    text = tpl.safe_decode(enc["input_ids"])
    assert "<tool_response>\nPARIS_RESULT 18 C\n</tool_response>" in text and '"name": "calculator"' in text


def test_openai_shaped_rows_and_tools_as_list(tok):
    tpl = get_template(tok, agent_template="react_en")
    row = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "2*3?"},
        {"role": "assistant", "content": "Thought: use the calculator", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2*3"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "6"},
        {"role": "assistant", "content": "6"}]}
    enc = tpl.encode(row)
    labels = tpl.safe_decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert labels == ('Thought: use the calculator\nAction: calculator\nAction Input: {"expression": "2*3"}<|im_end|>'
                      "6<|im_end|>")
    tpl.set_mode("infer")
    prompt = tpl.safe_decode(tpl.encode({"tools": TOOLS, "messages": row["messages"][:3]})["input_ids"])
    assert prompt.endswith("Observation: 6<|im_end|>\n<|im_start|>assistant\n")


def test_agent_loss_scales(tok):
    tpl = get_template(tok, loss_scale="hermes")
    enc = tpl.encode(ROW)
    weights = {w for w in enc["loss_scale"]}
    assert weights == {0.0, 1.0, 2.0}
    call_tokens = [t for t, w in zip(enc["input_ids"], enc["loss_scale"]) if w == 2.0]
    assert tpl.safe_decode(call_tokens).startswith("<tool_call>")
    react = get_template(tok, agent_template="react_en", loss_scale="react")
    enc = react.encode(ROW)
    assert max(enc["loss_scale"]) == 2.0
    # exact keys with [key, following] weights, regex keys with one weight
    scale = rules_from_json({"exact": {"Action:": [2.0, 3.0], "Observation:": [0.0, 0.0]},
                             "regex": {r"\d+": 5.0}}, "t")
    text = "Action: f\nObservation: x\nAction: g"
    spans = scale.span_weights("assistant", text)
    w = [1.0] * len(text)
    for a, b, x in spans:
        w[a:b] = [x] * (b - a)
    assert w[text.index("f")] == 3.0 and w[text.index("x")] == 0.0 and w[text.index("g")] == 3.0
    assert w[0] == 2.0
    assert get_loss_scale("ignore_empty_think").has_span_rules
    with pytest.raises(ValueError):
        rules_from_json({"regex": {"a+": [1.0, 2.0]}}, "bad")


def test_loss_scale_json_file(tmp_path, tok):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"<tool_call>": [2.0, 2.0], "</tool_call>": [2.0, 1.0]}))
    tpl = get_template(tok, loss_scale=str(path))
    enc = tpl.encode(ROW)
    assert 2.0 in enc["loss_scale"]


def test_builtin_tool_calls_dataset(tok):
    from lmforge.dataset import load_dataset

    train = load_dataset(["builtin:tool-calls"], shuffle=False)[0]
    test = load_dataset(["builtin:tool-calls:test"], shuffle=False)[0]
    assert len(train) == 2000 and len(test) == 200
    names = {json.loads(r["solution"])["name"] for r in test}
    assert names == {"calculator", "weather"}
    seen = {r["messages"][0]["content"] + r["messages"][2]["content"] for r in train}
    assert not any(r["messages"][0]["content"] + r["messages"][2]["content"] in seen for r in test)
    for r in list(train)[:20]:  # the arguments are drawn from the question
        sol = json.loads(r["solution"])
        assert next(iter(sol["arguments"].values())) in r["messages"][0]["content"]
    enc = get_template(tok).encode(train[0])
    assert enc["length"] < 512


def test_engine_parses_and_streams_tool_calls(tok):
    """A model that always answers with a tool call (scripted): non-streamed and streamed replies agree."""
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine, _Row

    engine = HfEngine("builtin:tiny", device="cpu")
    reply = 'Checking.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]

    def fake_generate(jobs, cfg, *, streamer=None, cancel=None):
        if streamer is not None:
            streamer.put(__import__("torch").tensor([0]))  # the prompt
            for t in ids:
                streamer.put(__import__("torch").tensor([t]))
        return [[_Row(ids, reply, "stop")]]

    engine._generate = fake_generate
    req = InferRequest(messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS)
    msg = engine.infer([req], RequestConfig(max_tokens=50))[0].choices[0]
    assert msg.finish_reason == "tool_calls" and msg.message.content == "Checking."
    assert msg.message.tool_calls[0].function.name == "weather"
    assert json.loads(msg.message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    chunks = list(engine.infer_stream(req, RequestConfig(max_tokens=50)))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Checking." and "<tool_call>" not in content
    last = chunks[-1].choices[0]
    assert last.finish_reason == "tool_calls"
    call = last.delta.tool_calls[0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call")
    assert call["function"]["name"] == "weather"
    # without tools in the request nothing is parsed: the text is the content
    plain = InferRequest(messages=req.messages)
    out = engine.infer([plain], RequestConfig(max_tokens=50))[0].choices[0]
    assert out.message.tool_calls is None and out.message.content == reply and out.finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in engine.infer_stream(plain) if c.choices) == reply
