"""A reward model from a causal-LM checkpoint: the same transformer with a new scalar head.

``rlhf_type rm`` trains ``AutoModelForSequenceClassification`` with ``num_labels=1``: the reward
of a conversation is the head's output at its last token (transformers' pooling: the rightmost
token that is not padding). Instead of loading the checkpoint a second time, the causal LM that
the training set-up already loaded gives its transformer body to the new model (shared, not
copied) and only the head is created, so there is one copy of the weights.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

logger = logging.getLogger(__name__)


def reward_head_names(model: Any) -> list[str]:
    """Top-level modules outside the transformer body (``score`` for most decoder-only models)."""
    return [name for name, _ in model.named_children() if name != model.base_model_prefix]


def reward_model_from_causal_lm(causal_lm: Any, tokenizer: Any) -> Any:
    """``AutoModelForSequenceClassification`` (one label) sharing ``causal_lm``'s body; the head is new.

    The head is initialised from ``N(0, initializer_range)`` as transformers does for new heads.
    ``pad_token_id`` is set in the config so batched scoring finds each row's last token.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.problem_type = "regression"
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    param = next(body.parameters())
    with torch.device("meta"):  # build the skeleton without allocating a second body
        rm = AutoModelForSequenceClassification.from_config(config, dtype=param.dtype)
    setattr(rm, rm.base_model_prefix, body)
    std = getattr(config, "initializer_range", 0.02)
    for name in reward_head_names(rm):
        head = getattr(rm, name).to_empty(device=param.device)
        for p in head.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=std)
            else:
                torch.nn.init.zeros_(p)
    logger.info("Reward model: %s with a new %s head on the %s body", type(rm).__name__,
                "/".join(reward_head_names(rm)), config.model_type)
    return rm
