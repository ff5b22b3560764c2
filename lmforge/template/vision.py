"""Images and videos through the model's processor: ``<image>``/``<video>`` tags become content parts,
placeholders expand to each image's or video's tokens, and batches get their pixels.

The Template renders a conversation with the chat template as usual, with each ``<image>`` tag turned into
an image content part (which the model's template renders as its placeholder, e.g. Qwen2-VL's
``<|vision_start|><|image_pad|><|vision_end|>``) and each ``<video>`` tag into a video part (``<|video_pad|>``).
Labels are found on that rendering by the usual prefix method; then every placeholder token is repeated as
many times as the processor gives the image tokens (its size after ``min_pixels``/``max_pixels`` resizing) or
the video tokens (``grid_t * grid_h * grid_w / merge_size**2``, :mod:`lmforge.template.video`), and each copy
carries the placeholder's weight. The result is the processor's own ``apply_chat_template`` output, token for
token, and image and video tokens are never labels. Pixels are read only when a batch is built
(:meth:`VisionEncoder.pixel_inputs`), so the encoded dataset stores references, not pixel arrays.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Sequence

from lmforge.dataset.media import (IMAGE_TAG, VIDEO_TAG, MediaError, image_size, is_video_file, open_image,
                                   read_video, ref_cache, video_info)

_TAGS = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


class VisionEncoder:
    """What the Template needs from a vision-language processor (Qwen2-VL's, LLaVA's, ...)."""

    def __init__(self, processor: Any, error: type[ValueError] = ValueError):
        self.processor = processor
        self.image_processor = processor.image_processor
        self.image_token = processor.image_token
        self.image_token_id = int(processor.image_token_id)
        self.video_token = getattr(processor, "video_token", None)
        video_token_id = getattr(processor, "video_token_id", None)
        self.video_token_id = int(video_token_id) if video_token_id is not None else None
        self.video_processor = getattr(processor, "video_processor", None)  # transformers' (needs torchvision)
        self.error = error
        self.video, self.no_video = None, _video_refusal(processor)
        # Qwen2.5-VL: rotary time positions per second of video; None for families whose video time axis is the
        # temporal patch index (Qwen2-VL)
        self.tokens_per_second = ((getattr(processor, "video_options", None) or {}).get("tokens_per_second")
                                  if _time_scaled(processor) else None)
        if self.no_video is None:
            from lmforge.template.video import VideoSpec

            options = getattr(processor, "video_options", None) or {}
            try:
                self.video = VideoSpec.from_sources(self.video_processor, options.get("config"), self.image_processor,
                                                    fps=options.get("fps"), max_frames=options.get("max_frames"))
            except ValueError as e:
                raise error(str(e)) from None

    @property
    def token_ids(self) -> set[int]:
        return {i for i in (self.image_token_id, self.video_token_id) if i is not None}

    def check_renders(self, render: Any) -> None:
        """The chat template must render an image part as exactly one placeholder (a video part likewise, else
        videos are refused with that reason)."""
        text = render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
        if text.count(self.image_token) != 1:
            raise self.error(f"the chat template does not render an image content part as {self.image_token!r}; "
                             "it cannot be used for images")
        if self.video is not None:
            text = render([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "x"}]}])
            if text.count(self.video_token) != 1:
                self.video, self.no_video = None, (f"the chat template does not render a video content part as "
                                                   f"{self.video_token!r}")

    # ---- tags -> content parts ----------------------------------------------------------------------

    def to_parts(self, messages: list[dict], images: list[str], videos: list | None = None) -> list[dict]:
        """Messages whose content holds ``<image>``/``<video>`` tags, with that content as text, image and video
        parts (the k-th tag of a kind is the k-th image or video of the row).

        Rows with images (videos) but no tags of that kind get them at the start of the first user message (as
        LLaVA data without tags means). Media in assistant replies are refused: a reply is generated text.
        """
        videos = list(videos or [])
        if videos and self.video is None:
            raise self.error(f"the row has {len(videos)} video(s) but this model takes none: {self.no_video}")
        lead = ""
        for tag, items, what in ((IMAGE_TAG, images, "images"), (VIDEO_TAG, videos, "videos")):
            tags = sum(m["content"].count(tag) for m in messages if isinstance(m.get("content"), str))
            if tags == 0 and items:
                lead, tags = lead + tag * len(items), len(items)
            if tags != len(items):
                raise self.error(f"the messages hold {tags} {tag} tag(s) but the row has {len(items)} {what}")
        if lead:
            first = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
            if first is None:
                raise self.error("the row has images or videos but no user message to put them in")
            messages = list(messages)
            messages[first] = {**messages[first], "content": lead + (messages[first]["content"] or "")}
        out = []
        for k, m in enumerate(messages):
            content = m.get("content")
            if not isinstance(content, str) or not _TAGS.search(content):
                out.append(m)
                continue
            if m["role"] == "assistant":
                raise self.error(f"messages[{k}]: an assistant reply holds {IMAGE_TAG} or {VIDEO_TAG}; images and "
                                 "videos go in user messages")
            parts = [{"type": "image"} if piece == IMAGE_TAG else {"type": "video"} if piece == VIDEO_TAG
                     else {"type": "text", "text": piece} for piece in _TAGS.split(content) if piece]
            out.append({**m, "content": parts})
        return out

    # ---- placeholders -> image and video tokens -----------------------------------------------------

    @ref_cache(maxsize=4096)
    def num_tokens(self, ref: str) -> int:
        """Image tokens of one image after the processor resizes it."""
        try:
            size = image_size(ref)
        except MediaError as e:
            raise self.error(str(e)) from None
        data = self.processor._get_num_multimodal_tokens(image_sizes=[list(size)])
        return int(data["num_image_tokens"][0] if isinstance(data, dict) else data.num_image_tokens[0])

    @ref_cache(maxsize=4096)
    def _video_shape(self, video: tuple[str, ...]) -> tuple[list[int], int, int, float | None]:
        """The indices of the frames a video uses, its frames' height and width, and the rate of the frames used
        (a file's rate times the share of its frames used; None for a list of frames), from headers only."""
        try:
            if len(video) == 1 and is_video_file(video[0]):
                total, fps, h, w = video_info(video[0])
                indices = self.video.sample(total, fps)
                return indices, h, w, (len(indices) / total * fps if fps else None)
            h, w = image_size(video[0])
            return self.video.sample(len(video), None), h, w, None
        except (MediaError, ValueError) as e:
            raise self.error(str(e)) from None

    def num_video_tokens(self, video: Sequence[str]) -> int:
        """Video tokens of one video (a list of frame references, or ``[video file]``)."""
        if self.video is None:
            raise self.error(f"this model takes no videos: {self.no_video}")
        frames, h, w, _ = self._video_shape(tuple(video))
        return self.video.num_tokens(len(frames), h, w)

    def expand(self, text: str, weights: list[float], images: list[str],
               videos: Sequence[Sequence[str]] = ()) -> tuple[str, list[float]]:
        """Repeat the k-th image (video) placeholder as many times as image (video) k has tokens; its characters'
        weight goes along."""
        tokens = [self.image_token] + ([self.video_token] if self.video is not None else [])
        found = list(re.finditer("|".join(re.escape(t) for t in tokens), text))
        counts = {t: sum(m.group() == t for m in found) for t in tokens}
        if counts[self.image_token] != len(images):
            raise self.error(f"the chat template rendered {counts[self.image_token]} image placeholder(s) for "
                             f"{len(images)} image(s)")
        if videos and counts.get(self.video_token) != len(videos):
            raise self.error(f"the chat template rendered {counts.get(self.video_token, 0)} video placeholder(s) "
                             f"for {len(videos)} video(s)")
        img, vid = iter(images), iter(videos)
        pieces, new_w, pos = [], [], 0
        for m in found:
            token, start = m.group(), m.start()
            n = self.num_tokens(next(img)) if token == self.image_token else self.num_video_tokens(next(vid))
            pieces += [text[pos:start], token * n]
            new_w += weights[pos:start] + weights[start:start + len(token)] * n
            pos = start + len(token)
        pieces.append(text[pos:])
        new_w += weights[pos:]
        return "".join(pieces), new_w

    # ---- batches --------------------------------------------------------------------------------------

    def pixel_inputs(self, images: list[str], videos: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
        """The processors' tensors for ``images`` and ``videos`` in order (pixel_values, image_grid_thw,
        pixel_values_videos, video_grid_thw, ...)."""
        out: dict[str, Any] = {}
        try:
            if images:
                out.update(self.image_processor(images=[open_image(ref) for ref in images], return_tensors="pt"))
            if videos:
                if self.video is None:
                    raise self.error(f"this model takes no videos: {self.no_video}")
                shapes = [self._video_shape(tuple(v)) for v in videos]  # one header read per video
                out.update(self.video.pixel_inputs([self._frames(v, s) for v, s in zip(videos, shapes)],
                                                   self.video_processor))
                if self.tokens_per_second is not None:
                    import torch

                    out["second_per_grid_ts"] = torch.tensor([self.seconds_per_grid(s[3]) for s in shapes],
                                                             dtype=torch.float32)
        except MediaError as e:
            raise self.error(str(e)) from None
        return out

    def seconds_per_grid(self, rate: float | None) -> float:
        """Seconds of video one temporal patch spans: ``temporal_patch_size`` over the rate of the frames used
        (:meth:`_video_shape`'s; a list of frames has no rate, and counts as 24 frames a second, as transformers'
        processor takes it)."""
        return self.video.temporal_patch_size / (rate or 24.0)

    def time_scales(self, pixels: dict[str, Any]) -> Any:
        """``tokens_per_second * second_per_grid_ts`` of a batch's videos (Qwen2.5-VL), None otherwise: what
        :func:`lmforge.model.vision.mrope_position_ids` spaces their time axes by."""
        seconds = pixels.get("second_per_grid_ts")
        if seconds is None or self.tokens_per_second is None:
            return None
        return [float(self.tokens_per_second) * float(x) for x in seconds]

    def frames(self, video: Sequence[str]) -> list[Any]:
        """The RGB frames a video uses (decoded from its file, or its listed frames thinned to the cap)."""
        if self.video is None:
            raise self.error(f"this model takes no videos: {self.no_video}")
        return self._frames(video, self._video_shape(tuple(video)))

    def _frames(self, video: Sequence[str], shape: tuple) -> list[Any]:
        indices, h, w, _ = shape
        if len(video) == 1 and is_video_file(video[0]):
            return read_video(video[0], indices, self.video.resizer(h, w))
        return [open_image(video[k]) for k in indices]

    def token_type_ids(self, input_ids: Any) -> Any:
        """0 for text, 1 for image tokens, 2 for video tokens (what Qwen2-VL's rotary positions read)."""
        out = (input_ids == self.image_token_id).int()
        if self.video_token_id is not None:
            out += 2 * (input_ids == self.video_token_id).int()
        return out

    def cache_key(self) -> str:
        config = self.image_processor.to_dict() if hasattr(self.image_processor, "to_dict") else {}
        payload = {"image_token": self.image_token, "processor": type(self.processor).__name__,
                   "image_processor": {k: v for k, v in config.items() if k != "processor_class"},
                   "video": self.video.cache_key() if self.video is not None else self.no_video}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _video_refusal(processor: Any) -> str | None:
    """Why a processor's model takes no videos here (None: it does, in Qwen2-VL's layout)."""
    if getattr(processor, "video_token_id", None) is None or getattr(processor, "video_token", None) is None:
        return f"{type(processor).__name__} has no video token"
    if _time_scaled(processor) and not (getattr(processor, "video_options", None) or {}).get("tokens_per_second"):
        return ("Qwen2.5-VL videos need the model's vision_config.tokens_per_second (it scales their rotary time "
                "axis), which this processor was loaded without")
    return None


def _time_scaled(processor: Any) -> bool:
    """Qwen2.5-VL spaces a video's temporal patches by its seconds per patch (``second_per_grid_ts``)."""
    return type(processor).__name__.startswith("Qwen2_5_VL")
