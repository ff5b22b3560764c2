"""Built-in registered templates: prompt formats for models whose tokenizer lacks a chat template
(base models) or that need more than it gives (a default system prompt, thinking on/off).

Each entry is a ``TemplateMeta``: a jinja string, written here in the style of its model family,
plus extra stop words. It is a factory ``meta(tokenizer, **options) -> Template`` and reuses the
same prefix-rendering machinery as tokenizer-derived templates. Register your own with
``TEMPLATES.register("name", TemplateMeta(...))`` (or any callable with that signature) in a
file passed to ``--external_plugins``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmforge.registry import TEMPLATES

from .base import Template


@dataclass(frozen=True)
class TemplateMeta:
    """A registered prompt format: builds a Template for a tokenizer."""

    name: str
    chat_template: str
    stop_words: tuple[str, ...] = ()
    template_kwargs: dict = field(default_factory=dict)  # defaults for jinja variables

    def __call__(self, tokenizer: Any, **kwargs: Any) -> Template:
        stop_words = (*self.stop_words, *kwargs.pop("stop_words", ()))
        template_kwargs = {**self.template_kwargs, **(kwargs.pop("template_kwargs", None) or {})}
        return Template(tokenizer, name=self.name, chat_template=self.chat_template, stop_words=stop_words,
                        template_kwargs=template_kwargs, **kwargs)


# --- shared jinja pieces -------------------------------------------------------------------------

_SPLIT_SYSTEM = (
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system_text = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system_text = DEFAULT_SYSTEM %}{%- set turns = messages %}{%- endif %}"
)


def _split_system(default: str | None) -> str:
    """Jinja that sets ``system_text`` (the row's, else ``default``) and ``turns`` (the rest)."""
    return _SPLIT_SYSTEM.replace("DEFAULT_SYSTEM", json.dumps(default) if default else "''")


def _calls(args_key: str, before: str, after: str) -> str:
    """Jinja rendering ``m.tool_calls`` as ``{"name": ..., args_key: ...}``, each between before/after."""
    return (
        "{%- for call in m.tool_calls or [] %}"
        "{%- if m.content or not loop.first %}{{- '\\n' }}{%- endif %}"
        "{%- set f = call.function if call.function is defined else call %}"
        "{{- '" + before + "{\"name\": \"' + f.name + '\", \"" + args_key + "\": ' }}"
        "{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}"
        "{{- '}" + after + "' }}"
        "{%- endfor %}"
    )


# --- default: plain headers, for base models -------------------------------------------------------

DEFAULT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{%- if tools %}{{- '### Tools:\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}{{- '\\n' }}{%- endif %}"
    "{%- for m in turns %}"
    "{%- if m.role == 'assistant' %}{{- '### Assistant:\\n' + (m.content or '') }}"
    + _calls("arguments", "<tool_call>", "</tool_call>") +
    "{{- (eos_token if eos_token is defined and eos_token else '') + '\\n\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '### Tool:\\n' + m.content + '\\n\\n' }}"
    "{%- else %}{{- '### User:\\n' + m.content + '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\\n' }}{%- endif %}"
)


# --- ChatML family (chatml, qwen, qwen3) -----------------------------------------------------------

def chatml_template(default_system: str | None = None, thinking: bool = False) -> str:
    """ChatML with tools in the system turn; ``thinking`` adds Qwen3-style reasoning handling.

    With ``thinking``, a reply's ``<think>...</think>`` block is kept only for turns after the last
    user message (earlier reasoning is dropped, as reasoning models expect), and
    ``enable_thinking=False`` puts an empty think block in the generation prompt.
    """
    think = (
        "{%- set reasoning = m.reasoning_content or '' %}"
        "{%- if '</think>' in text %}"
        "{%- set reasoning = text.split('</think>')[0].split('<think>')[-1] %}"
        "{%- set text = text.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
        "{%- if loop.index0 > ns.last_user %}"
        "{%- set text = '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + text %}{%- endif %}"
    ) if thinking else ""
    last_user = (
        "{%- set ns = namespace(last_user=-1) %}"
        "{%- for m in turns %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    ) if thinking else ""
    empty_think = (
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    ) if thinking else ""
    return (
        _split_system(default_system) + last_user +
        "{%- if tools %}{{- '<|im_start|>system\\n' }}"
        "{%- if system_text %}{{- system_text + '\\n\\n' }}{%- endif %}"
        "{{- '# Tools\\n\\nThese functions are available. To call one, reply with a JSON object "
        "{\"name\": ..., \"arguments\": ...} inside <tool_call></tool_call> tags.\\n<tools>' }}"
        "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
        "{{- '\\n</tools><|im_end|>\\n' }}"
        "{%- elif system_text %}{{- '<|im_start|>system\\n' + system_text + '<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in turns %}"
        "{%- if m.role == 'assistant' %}{%- set text = m.content or '' %}" + think +
        "{{- '<|im_start|>assistant\\n' + text }}"
        + _calls("arguments", "<tool_call>\\n", "\\n</tool_call>") +
        "{{- '<|im_end|>\\n' }}"
        "{%- elif m.role == 'tool' %}"
        "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
        "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}" + empty_think + "{%- endif %}"
    )


# --- Llama 3 ----------------------------------------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{{- bos_token if bos_token is defined and bos_token else '' }}"
    + _split_system(None) +
    "{%- if system_text or tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_text }}"
    "{%- if tools %}{%- if system_text %}{{- '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these functions; to call one, answer with only a JSON object "
    "{\"name\": ..., \"parameters\": ...}.' }}"
    "{%- for tool in tools %}{{- '\\n\\n' + (tool | tojson) }}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for m in turns %}"
    "{%- if m.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' + (m.content or '') }}"
    + _calls("parameters", "", "") +
    "{{- '<|eot_id|>' }}"
    "{%- elif m.role == 'tool' %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."

for _meta in (
    TemplateMeta("default", DEFAULT_TEMPLATE, stop_words=("### User:",)),
    TemplateMeta("chatml", chatml_template(), stop_words=("<|im_end|>", "<|endoftext|>")),
    TemplateMeta("qwen", chatml_template(QWEN_DEFAULT_SYSTEM), stop_words=("<|im_end|>", "<|endoftext|>")),
    TemplateMeta("qwen3", chatml_template(thinking=True), stop_words=("<|im_end|>", "<|endoftext|>")),
    TemplateMeta("llama3", LLAMA3_TEMPLATE, stop_words=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
):
    TEMPLATES.register(_meta.name, _meta)
