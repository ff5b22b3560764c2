"""Conformance of the tokenizer-derived template across model families.

Each family's chat template is our own jinja written in that family's style (tests/chat_templates/
and the registered templates in lmforge/template/registered.py). The built-in tokenizer gets the
family's special tokens and template; for every conversation the encoding must equal
``apply_chat_template`` token for token, and the labelled tokens, run by run, must decode to each
assistant reply plus its end-of-turn marker.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from lmforge.model.builtin import TOKENIZER_DIR  # noqa: E402
from lmforge.registry import TEMPLATES  # noqa: E402
from lmforge.template import IGNORE_INDEX, get_template  # noqa: E402

TEMPLATE_DIR = Path(__file__).parent / "chat_templates"


@pytest.fixture(scope="module")
def base_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _registered(name: str) -> str:
    return TEMPLATES.get(name).chat_template


# family -> (chat template, special tokens to add, how a labelled reply looks)
FAMILIES = {
    "builtin_chatml": (None, {}, lambda r: r + "<|im_end|>"),
    "qwen2.5": (_registered("qwen"), {}, lambda r: r + "<|im_end|>"),
    "llama3": (_registered("llama3"),
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]},
               lambda r: r + "<|eot_id|>"),
    "mistral": ((TEMPLATE_DIR / "mistral.jinja").read_text(),
                {"bos_token": "<s>", "eos_token": "</s>", "extra_special_tokens": ["[INST]", "[/INST]"]},
                lambda r: " " + r + "</s>"),
    "gemma": ((TEMPLATE_DIR / "gemma.jinja").read_text(),
              {"bos_token": "<bos>", "eos_token": "<eos>",
               "extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
              lambda r: r + "<end_of_turn>"),
    "phi3": ((TEMPLATE_DIR / "phi3.jinja").read_text(),
             {"eos_token": "<|endoftext|>",
              "extra_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
             lambda r: r + "<|end|>"),
    "deepseek_v3": ((TEMPLATE_DIR / "deepseek_v3.jinja").read_text(),
                    {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                     "extra_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]},
                    lambda r: r + "<｜end▁of▁sentence｜>"),
    "default": (_registered("default"), {}, lambda r: r + "<|im_end|>"),
}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+3?"},
               {"role": "assistant", "content": "2+3 = 5."}],
    "system_multi": [{"role": "system", "content": "You are a terse math tutor."},
                     {"role": "user", "content": "What is 12+7?"},
                     {"role": "assistant", "content": "19"},
                     {"role": "user", "content": "And times two?"},
                     {"role": "assistant", "content": "38.\nDouble 19 is 38."}],
    "three_turns": [{"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello, how can I help?"},
                    {"role": "user", "content": "天气怎么样？"},
                    {"role": "assistant", "content": "今天是晴天。"},
                    {"role": "user", "content": "Thanks"},
                    {"role": "assistant", "content": "You're welcome!"}],
}


def family_tokenizer(base, family: str):
    chat_template, specials, _ = FAMILIES[family]
    tok = copy.deepcopy(base)
    if specials:
        tok.add_special_tokens(specials)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def labelled_runs(tok, enc) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == t
            cur.append(t)
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_conformance(base_tokenizer, family, conv, caplog):
    tok = family_tokenizer(base_tokenizer, family)
    messages = CONVERSATIONS[conv]
    with caplog.at_level(logging.WARNING, logger="lmforge.template"):
        template = get_template(tok)
        enc = template.encode({"messages": messages})
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # prefix property holds
    assert enc["input_ids"] == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert enc["length"] == len(enc["input_ids"]) and enc["loss_scale"] is None
    expect = FAMILIES[family][2]
    assert labelled_runs(tok, enc) == [expect(m["content"]) for m in messages if m["role"] == "assistant"]
    # infer: the prompt is the rendering with the generation prompt, and stops on the end-of-turn marker
    template.set_mode("infer")
    prompt = template.encode({"messages": messages[:-1]})
    assert prompt["input_ids"] == tok.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
    marker = expect("")
    assert marker.strip() in template.stop_words


def test_qwen25_default_system_and_tools(base_tokenizer):
    tok = family_tokenizer(base_tokenizer, "qwen2.5")
    template = get_template(tok)
    messages = CONVERSATIONS["single"]
    text = template.render(messages)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    row = {"messages": [{"role": "user", "content": "Add 2 and 3"},
                        {"role": "tool_call", "content": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
                        {"role": "tool_response", "content": "5"},
                        {"role": "assistant", "content": "It is 5."}],
           "tools": tools}
    enc = template.encode(row)
    jinja_messages = [row["messages"][0],
                      {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                      {"role": "tool", "content": "5"}, row["messages"][3]]
    assert enc["input_ids"] == tok.apply_chat_template(jinja_messages, tools=tools)["input_ids"]
    text = tok.decode(enc["input_ids"])
    assert "You are a helpful assistant.\n\n# Tools" in text and '"name": "add"' in text
    assert labelled_runs(tok, enc) == ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>',
                                       "It is 5.<|im_end|>"]


@pytest.mark.parametrize("family", ["qwen2.5", "llama3", "gemma", "mistral"])
def test_system_override_matches_apply_chat_template(base_tokenizer, family):
    tok = family_tokenizer(base_tokenizer, family)
    template = get_template(tok, system="Answer in French.")
    for conv in ("single", "system_multi"):
        messages = CONVERSATIONS[conv]
        expected = [{"role": "system", "content": "Answer in French."}] + [m for m in messages if m["role"] != "system"]
        enc = template.encode({"messages": messages})
        assert enc["input_ids"] == tok.apply_chat_template(expected)["input_ids"]
        assert "Answer in French." in tok.decode(enc["input_ids"])


THINK_CONV = [{"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n4"},
              {"role": "user", "content": "And 3+3?"},
              {"role": "assistant", "content": "<think>\nThree plus three.\n</think>\n\n6"}]


def test_qwen3_thinking_falls_back_and_warns(base_tokenizer, caplog):
    """Earlier reasoning is dropped by the template: labels follow the full rendering, with a warning."""
    tok = family_tokenizer(base_tokenizer, "qwen2.5")
    tok.chat_template = _registered("qwen3")
    with caplog.at_level(logging.WARNING, logger="lmforge.template"):
        from lmforge.template import jinja
        jinja._warned.clear()
        enc = get_template(tok).encode({"messages": THINK_CONV})
    assert any("prefix property" in r.getMessage() for r in caplog.records)
    assert enc["input_ids"] == tok.apply_chat_template(THINK_CONV)["input_ids"]
    assert "Two plus two" not in tok.decode(enc["input_ids"])
    assert labelled_runs(tok, enc) == ["4<|im_end|>", "<think>\nThree plus three.\n</think>\n\n6<|im_end|>"]


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen3_registered_enable_thinking(base_tokenizer, enable_thinking):
    template = get_template(base_tokenizer, "qwen3", enable_thinking=enable_thinking)
    template.set_mode("infer")
    prompt = template.safe_decode(template.encode({"messages": THINK_CONV[:1]})["input_ids"])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" if enable_thinking is False
                           else "<|im_start|>assistant\n")
    template.set_mode("train")
    row = {"messages": [THINK_CONV[0], {"role": "assistant", "content": "4"}]}
    runs = labelled_runs(base_tokenizer, template.encode(row))
    # thinking off: the empty think block is part of the prompt, only the answer is trained
    assert runs == (["4<|im_end|>"] if enable_thinking is False else ["<think>\n\n</think>\n\n4<|im_end|>"])


def test_deepseek_r1_forced_think_prompt(base_tokenizer, caplog):
    """The generation prompt opens <think> but the rendered turn does not: labels start where they part."""
    tok = family_tokenizer(base_tokenizer, "deepseek_v3")
    tok.chat_template = (TEMPLATE_DIR / "deepseek_r1.jinja").read_text()
    with caplog.at_level(logging.WARNING, logger="lmforge.template"):
        enc = get_template(tok).encode({"messages": THINK_CONV})
    assert enc["input_ids"] == tok.apply_chat_template(THINK_CONV)["input_ids"]
    assert labelled_runs(tok, enc) == ["4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"]


def test_template_rejecting_row_raises_template_error(base_tokenizer):
    from lmforge.template import TemplateError

    tok = family_tokenizer(base_tokenizer, "gemma")
    template = get_template(tok)
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "tool_call", "content": '{"name": "f"}'},
                        {"role": "tool_response", "content": "x"}, {"role": "assistant", "content": "b"}]}
    # Gemma's template renders no tools: the hermes agent template turns the calls into plain turns.
    assert template.agent_render and template.encode(row)["input_ids"]
    # A template that rejects the row (here: any tool role) still fails with a TemplateError.
    strict = get_template(tok, agent_template=None)
    strict.agent_render = False
    with pytest.raises(TemplateError, match="failed to render.*alternate"):
        strict.encode(row)
