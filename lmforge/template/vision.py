"""Images through the model's processor: ``<image>`` tags become content parts, placeholders expand to each
image's tokens, and batches get their pixels.

The Template renders a conversation with the chat template as usual, with each ``<image>`` tag turned into
an image content part (which the model's template renders as its placeholder, e.g. Qwen2-VL's
``<|vision_start|><|image_pad|><|vision_end|>``). Labels are found on that rendering by the usual prefix
method; then every placeholder token is repeated as many times as the processor gives the image tokens
(its size after ``min_pixels``/``max_pixels`` resizing), and each copy carries the placeholder's weight.
The result is the processor's own ``apply_chat_template`` output, token for token, and image tokens are
never labels. Pixels are read only when a batch is built (:meth:`VisionEncoder.pixel_inputs`), so the
encoded dataset stores image references, not pixel arrays.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

from lmforge.dataset.media import IMAGE_TAG, VIDEO_TAG, MediaError, image_size, open_image

_TAGS = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


class VisionEncoder:
    """What the Template needs from a vision-language processor (Qwen2-VL's, LLaVA's, ...)."""

    def __init__(self, processor: Any, error: type[ValueError] = ValueError):
        self.processor = processor
        self.image_processor = processor.image_processor
        self.image_token = processor.image_token
        self.image_token_id = int(processor.image_token_id)
        self.video_token_id = getattr(processor, "video_token_id", None)
        self.error = error

    @property
    def token_ids(self) -> set[int]:
        return {i for i in (self.image_token_id, self.video_token_id) if i is not None}

    def check_renders(self, render: Any) -> None:
        """The chat template must render an image part as exactly one placeholder."""
        text = render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
        if text.count(self.image_token) != 1:
            raise self.error(f"the chat template does not render an image content part as {self.image_token!r}; "
                             "it cannot be used for images")

    # ---- tags -> content parts ----------------------------------------------------------------------

    def to_parts(self, messages: list[dict], images: list[str], videos: list | None = None) -> list[dict]:
        """Messages whose content holds ``<image>`` tags, with that content as text and image parts.

        Rows with images but no tags get them at the start of the first user message (as LLaVA data
        without tags means). Images in assistant replies are refused: a reply is generated text.
        """
        if videos:
            raise self.error("videos are not supported yet (transformers' video processors need torchvision); "
                             "give the frames as images")
        tags = sum(m["content"].count(IMAGE_TAG) for m in messages if isinstance(m.get("content"), str))
        if tags == 0 and images:
            first = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
            if first is None:
                raise self.error("the row has images but no user message to put them in")
            messages = list(messages)
            messages[first] = {**messages[first], "content": IMAGE_TAG * len(images) + (messages[first]["content"] or "")}
            tags = len(images)
        if tags != len(images):
            raise self.error(f"the messages hold {tags} {IMAGE_TAG} tag(s) but the row has {len(images)} images")
        out = []
        for k, m in enumerate(messages):
            content = m.get("content")
            if not isinstance(content, str) or IMAGE_TAG not in content:
                out.append(m)
                continue
            if m["role"] == "assistant":
                raise self.error(f"messages[{k}]: an assistant reply holds {IMAGE_TAG}; images go in user messages")
            parts = [{"type": "image"} if piece == IMAGE_TAG else {"type": "text", "text": piece}
                     for piece in _TAGS.split(content) if piece]
            out.append({**m, "content": parts})
        return out

    # ---- placeholders -> image tokens ---------------------------------------------------------------

    @functools.lru_cache(maxsize=4096)
    def num_tokens(self, ref: str) -> int:
        """Image tokens of one image after the processor resizes it."""
        try:
            size = image_size(ref)
        except MediaError as e:
            raise self.error(str(e)) from None
        data = self.processor._get_num_multimodal_tokens(image_sizes=[list(size)])
        return int(data["num_image_tokens"][0] if isinstance(data, dict) else data.num_image_tokens[0])

    def expand(self, text: str, weights: list[float], images: list[str]) -> tuple[str, list[float]]:
        """Repeat the k-th placeholder as many times as image k has tokens; its characters' weight goes along."""
        token = self.image_token
        starts = [m.start() for m in re.finditer(re.escape(token), text)]
        if len(starts) != len(images):
            raise self.error(f"the chat template rendered {len(starts)} image placeholder(s) for {len(images)} "
                             "image(s)")
        pieces, new_w, pos = [], [], 0
        for start, ref in zip(starts, images):
            n = self.num_tokens(ref)
            pieces += [text[pos:start], token * n]
            new_w += weights[pos:start] + weights[start:start + len(token)] * n
            pos = start + len(token)
        pieces.append(text[pos:])
        new_w += weights[pos:]
        return "".join(pieces), new_w

    # ---- batches --------------------------------------------------------------------------------------

    def pixel_inputs(self, images: list[str]) -> dict[str, Any]:
        """The image processor's tensors for ``images`` in order (pixel_values, image_grid_thw, ...)."""
        if not images:
            return {}
        try:
            pil = [open_image(ref) for ref in images]
        except MediaError as e:
            raise self.error(str(e)) from None
        return dict(self.image_processor(images=pil, return_tensors="pt"))

    def token_type_ids(self, input_ids: Any) -> Any:
        """0 for text, 1 for image tokens, 2 for video tokens (what Qwen2-VL's rotary positions read)."""
        out = (input_ids == self.image_token_id).int()
        if self.video_token_id is not None:
            out += 2 * (input_ids == self.video_token_id).int()
        return out

    def cache_key(self) -> str:
        config = self.image_processor.to_dict() if hasattr(self.image_processor, "to_dict") else {}
        payload = {"image_token": self.image_token, "processor": type(self.processor).__name__,
                   "image_processor": {k: v for k, v in config.items() if k != "processor_class"}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
