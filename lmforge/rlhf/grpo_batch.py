"""GRPO's rollout batches as model inputs, and the completion logits a model gives them.

A rollout batch is ``[pad.. prompt | completion ..pad]`` per sequence (:func:`lmforge.rlhf.scoring.
prompt_completion_batch`). On image and video rows it also carries the pixels of every sequence's images
and videos: each prompt's media are processed once and repeated for its ``G`` generations, in sequence
order, so the policy, the sampling policy and the reference score a completion with the very pixels it was
sampled with. Qwen2-VL-family models then compute their multi-axis rotary positions themselves from the
attention mask and ``mm_token_type_ids``, so the batch's text ``position_ids`` are not passed with pixels.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from lmforge.rlhf.scoring import PIXEL_KEYS

__all__ = ["rollout_pixels", "completion_inputs", "completion_logits"]


def rollout_pixels(vision: Any, family: Any, input_ids: Tensor, prompt_images: Sequence[Sequence[str]],
                   prompt_of: Sequence[int], prompt_videos: Sequence[Sequence[Sequence[str]]] | None = None
                   ) -> dict[str, Tensor]:
    """Pixel inputs for a rollout batch whose sequence ``i`` answers prompt ``prompt_of[i]``, whose images and
    videos are ``prompt_images[p]`` and ``prompt_videos[p]`` (each video its frames, or ``[its file]``); {} when
    no sequence has either. Each key (``pixel_values``, ``pixel_values_videos``, ``second_per_grid_ts``, ...) is
    its prompts' tensors in sequence order: the model takes a batch's images, and its videos, in token order.
    Checked against the batch's image and video tokens."""
    from lmforge.trainers.vision_collator import check_image_tokens

    videos_of = prompt_videos if prompt_videos is not None else [()] * len(prompt_images)
    if not any(prompt_images[p] or videos_of[p] for p in prompt_of):
        return {}
    per_prompt = {p: vision.pixel_inputs(list(prompt_images[p]), [list(v) for v in videos_of[p]])
                  for p in dict.fromkeys(prompt_of) if prompt_images[p] or videos_of[p]}
    keys = dict.fromkeys(k for pixels in per_prompt.values() for k in pixels)
    dev = input_ids.device
    out = {k: torch.cat([per_prompt[p][k] for p in prompt_of if k in per_prompt.get(p, {})]).to(dev) for k in keys}
    check_image_tokens(vision, input_ids, [ref for p in prompt_of for ref in prompt_images[p]],
                       [list(v) for p in prompt_of for v in videos_of[p]])
    if family is not None and family.token_type_ids:
        out["mm_token_type_ids"] = vision.token_type_ids(input_ids)
    return out


def completion_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs of a rollout batch: ids and mask, with pixels (and then no text positions) on image
    and video rows, else the left-padding-aware text positions."""
    pixels = {k: batch[k] for k in PIXEL_KEYS if batch.get(k) is not None}
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **pixels}
    if not pixels:
        out["position_ids"] = batch["position_ids"]
    return out


def completion_logits(model: Any, batch: dict[str, Any], temperature: float = 1.0, logits_to_keep: bool = True
                      ) -> Tensor:
    """[B, C, V] logits that predict the completion tokens, divided by the sampling ``temperature``.

    ``logits_to_keep`` asks the model for the last ``C + 1`` positions only; a model whose forward does not take
    it raises TypeError (the caller then asks again without)."""
    C = batch["completion_ids"].shape[1]
    inputs = completion_inputs(batch)
    if logits_to_keep:
        logits = model(**inputs, use_cache=False, logits_to_keep=C + 1).logits
    else:
        logits = model(**inputs, use_cache=False).logits[:, -(C + 1):]
    logits = logits[:, :-1]
    if temperature not in (0, 1):
        logits = logits / temperature
    return logits
