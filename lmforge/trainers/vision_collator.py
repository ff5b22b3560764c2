"""The collator of vision-language rows: the text batch of :class:`Collator` plus the batch's pixels.

Rows carry image and video references (``images``, ``videos``) beside their token ids; pixels are read here,
when the batch is built, through the processor (so an encoded dataset stays small, and
``--dataloader_num_workers`` reads images and decodes videos in parallel). Qwen2-VL-family batches also get
``mm_token_type_ids`` (the model then computes its multi-axis rotary positions); packed batches get those
positions computed here, row by row (``lmforge.model.vision.mrope_position_ids``), because the model would
treat the flat sequence as one row.
"""
from __future__ import annotations

from typing import Any, Sequence

from lmforge.trainers.collator import Collator


class VisionCollator(Collator):
    def __init__(self, pad_token_id: int, vision: Any, family: Any, *, merge_size: int = 2,
                 padding_free: bool = False, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of)
        self.vision, self.family, self.merge_size = vision, family, merge_size

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        images = [ref for r in rows for ref in (r.get("images") or [])]
        videos = [list(v) for r in rows for v in (r.get("videos") or [])]
        out = super().__call__(rows)
        if not images and not videos:
            return out
        out.update(self.vision.pixel_inputs(images, videos))
        ids = out["input_ids"]
        check_image_tokens(self.vision, ids, images, videos)
        if self.family is not None and self.family.mrope and self.padding_free:
            from lmforge.model.vision import mrope_position_ids

            text = out["position_ids"][0]
            rope = mrope_position_ids(ids[0], text, out.get("image_grid_thw"), self.vision.image_token_id,
                                      self.merge_size, video_grid_thw=out.get("video_grid_thw"),
                                      video_token_id=self.vision.video_token_id,
                                      video_time_scales=self.vision.time_scales(out))
            out["position_ids"] = _packed_positions(text, rope)
        elif self.family is not None and self.family.token_type_ids:
            out["mm_token_type_ids"] = self.vision.token_type_ids(ids)
        return out


def check_image_tokens(vision: Any, input_ids: Any, images: list[str], videos: Sequence[Sequence[str]] = ()) -> None:
    """The batch ``input_ids`` must hold exactly the image (video) tokens its ``images`` (``videos``) give."""
    have, want = int((input_ids == vision.image_token_id).sum()), sum(vision.num_tokens(r) for r in images)
    if have != want:
        raise ValueError(f"a batch holds {have} image tokens but its {len(images)} images give {want}: an image "
                         "changed since the data was encoded, or --min_pixels/--max_pixels differ from "
                         "the encoding's")
    if videos or (vision.video_token_id is not None and bool((input_ids == vision.video_token_id).any())):
        have = int((input_ids == vision.video_token_id).sum())
        want = sum(vision.num_video_tokens(v) for v in videos)
        if have != want:
            raise ValueError(f"a batch holds {have} video tokens but its {len(videos)} videos give {want}: a video "
                             "changed since the data was encoded, or --video_fps/--video_max_frames differ from "
                             "the encoding's")


def _packed_positions(text: Any, rope: Any) -> Any:
    """``[4, 1, L]``: the restarting text positions (they mark the packed rows) over the three rotary axes."""
    import torch

    return torch.cat([text[None], rope]).unsqueeze(1)
