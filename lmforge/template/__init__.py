"""Template engine: canonical rows -> token ids, labels and loss weights, for any chat model.

``get_template(tokenizer)`` derives the template from the tokenizer's own jinja chat template;
``get_template(tokenizer, "qwen")`` uses a registered one (``registered.py``). See ``base.py`` for
the encoding modes and ``jinja.py`` for how labels are found.
"""
from __future__ import annotations

from typing import Any

from .base import IGNORE_INDEX, MaxLengthError, Template, TemplateError
from .agent import AgentTemplate, get_agent_template
from .loss_scale import LossScale, get_loss_scale

__all__ = ["get_template", "AgentTemplate", "get_agent_template", "Template", "TemplateError", "MaxLengthError", "IGNORE_INDEX", "LossScale",
           "get_loss_scale"]


def get_template(tokenizer: Any, template: str | None = None, *, system: str | None = None,
                 max_length: int | None = None, truncation_strategy: str = "right",
                 loss_scale: str | LossScale = "default", enable_thinking: bool | None = None,
                 agent_template: Any = None, processor: Any = None) -> Template:
    """The Template for ``tokenizer``.

    ``template`` None (or ``"auto"``) uses the tokenizer's chat template, or the registered
    ``default`` one when the tokenizer has none (base models). Any other value names a
    registered template (``TEMPLATES``). ``agent_template`` names an agent template
    (``AGENT_TEMPLATES``: hermes, react_en, llama3, glm4, mistral) that renders tools, tool calls and
    tool results as plain text; None keeps a chat template's own tool rendering where it has one
    (``template.agent_template`` is then the matching parser) and uses ``hermes`` where it has none.
    ``processor`` (a vision-language model's) makes ``<image>`` tags and ``images`` work (``vision.py``).
    """
    from lmforge.registry import TEMPLATES

    options = dict(system=system, max_length=max_length, truncation_strategy=truncation_strategy,
                   loss_scale=loss_scale, enable_thinking=enable_thinking, agent_template=agent_template)
    if processor is not None:
        options["processor"] = processor
    if template in (None, "auto"):
        if getattr(tokenizer, "chat_template", None):
            return Template(tokenizer, name="auto", **options)
        from .jinja import logger

        logger.info("tokenizer %r has no chat template; using the registered 'default' template",
                    getattr(tokenizer, "name_or_path", ""))
        template = "default"
    if template not in TEMPLATES:
        raise TemplateError(TEMPLATES.unknown_message(template))
    return TEMPLATES.get(template)(tokenizer, **options)
