"""Qwen2-VL video pixels in numpy: frames -> ``pixel_values_videos`` and ``video_grid_thw``.

Why by hand: transformers' video processors (``Qwen2VLVideoProcessor``) work on torch tensors through
torchvision's transforms, and torchvision has no CPU build for the torch we run (the PyPI wheel is the CUDA
build and does not import beside CPU torch). Images already go through the image processor's PIL/numpy path;
videos go through this one, in the video processor's layout, so the model cannot tell the difference:

- every frame of a video is resized to one size, chosen by Qwen2-VL's ``smart_resize`` on the first frame
  (sides multiples of ``patch_size * merge_size``, area within the video's min/max pixels), with PIL's
  resampling as the image processor does; then rescaled (``x * rescale_factor``, in float64 then float32)
  and normalised with the processor's mean and std;
- frames are padded to a multiple of ``temporal_patch_size`` by repeating the last one; ``grid_t`` is their
  number over ``temporal_patch_size``, ``grid_h``/``grid_w`` the sides over ``patch_size``;
- a row of ``pixel_values_videos`` is one patch, in the order (grid_t, grid_h/merge, grid_w/merge, merge,
  merge) and, within the row, (channel, temporal patch, patch row, patch column).

The image processor lays out an image the same way with its one frame repeated ``temporal_patch_size``
times, so a one-frame video gives the image's pixels (tests/test_vl_video.py checks that, and the layout
against transformers' video processor where torchvision imports). When the loaded processor has
transformers' video processor, :meth:`VideoSpec.pixel_inputs` uses it instead, with these sizes.

Which frames of a video file are used (:meth:`VideoSpec.sample`) follows Qwen2-VL's processor too:
``--video_fps`` frames per second of video (2.0 by default), at least ``min_frames`` (4), at most
``--video_max_frames``, a multiple of ``temporal_patch_size``, evenly spaced. A video given as a list of
frames uses every frame (more than ``--video_max_frames`` are thinned evenly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["DEFAULT_VIDEO_FPS", "DEFAULT_VIDEO_MAX_FRAMES", "VideoSpec", "smart_resize"]

DEFAULT_VIDEO_FPS = 2.0
DEFAULT_VIDEO_MAX_FRAMES = 64

# Qwen2VLVideoProcessor's class defaults: a checkpoint's video config (else its image processor's) overrides them.
_QWEN2_VL_VIDEO = dict(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, patch_size=14, temporal_patch_size=2,
                       merge_size=2, image_mean=(0.48145466, 0.4578275, 0.40821073),
                       image_std=(0.26862954, 0.26130258, 0.27577711), rescale_factor=1 / 255, resample=3,
                       do_resize=True, do_rescale=True, do_normalize=True, min_frames=4)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: each side rounded to a multiple of ``factor``, the area then scaled into
    ``[min_pixels, max_pixels]`` keeping the aspect ratio (down: floor, up: ceil)."""
    if max(height, width) > 200 * min(height, width):
        raise ValueError(f"a {width}x{height} frame: the aspect ratio must be below 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def _get(source: Any, key: str) -> Any:
    return source.get(key) if isinstance(source, dict) else getattr(source, key, None)


def _size_bounds(source: Any) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) from a processor or its config: ``size`` {shortest_edge, longest_edge} first."""
    size = _get(source, "size")
    lo, hi = _get(size, "shortest_edge") if size is not None else None, \
        _get(size, "longest_edge") if size is not None else None
    return lo or _get(source, "min_pixels"), hi or _get(source, "max_pixels")


@dataclass(frozen=True)
class VideoSpec:
    """How a video becomes Qwen2-VL's patches and how many of its frames are used."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    resample: int
    do_resize: bool
    do_rescale: bool
    do_normalize: bool
    min_frames: int
    fps: float = DEFAULT_VIDEO_FPS
    max_frames: int = DEFAULT_VIDEO_MAX_FRAMES

    @classmethod
    def from_sources(cls, *sources: Any, fps: float | None = None, max_frames: int | None = None) -> "VideoSpec":
        """The spec from the first source (a video processor, its JSON config, an image processor) that sets each
        value, else Qwen2-VL's video defaults, as transformers loads a video processor (a checkpoint without a
        video config gets its image processor's)."""
        values = dict(_QWEN2_VL_VIDEO)
        for source in reversed([s for s in sources if s is not None]):
            lo, hi = _size_bounds(source)
            values.update({k: v for k, v in (("min_pixels", lo), ("max_pixels", hi)) if v})
            for key in values:
                if key not in ("min_pixels", "max_pixels") and _get(source, key) is not None:
                    values[key] = _get(source, key)
        values["image_mean"] = tuple(float(x) for x in np.broadcast_to(values["image_mean"], (3,)))
        values["image_std"] = tuple(float(x) for x in np.broadcast_to(values["image_std"], (3,)))
        values["resample"] = int(values["resample"])
        fps = DEFAULT_VIDEO_FPS if fps is None else float(fps)
        max_frames = DEFAULT_VIDEO_MAX_FRAMES if max_frames is None else int(max_frames)
        if fps <= 0 or max_frames < 1:
            raise ValueError(f"--video_fps must be positive and --video_max_frames at least 1 (got {fps}, "
                             f"{max_frames})")
        if values["min_pixels"] > values["max_pixels"]:
            raise ValueError(f"video frames: min_pixels {values['min_pixels']} > max_pixels {values['max_pixels']}")
        return cls(**values, fps=fps, max_frames=max_frames)

    # ---- sizes and counts ------------------------------------------------------------------------------

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The size every frame of a ``height`` x ``width`` video is resized to."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def resizer(self, height: int, width: int) -> Any:
        """A function resizing one ``height`` x ``width`` frame (PIL) to :meth:`frame_size` as :meth:`patches`
        would (None when the size stays): video files are decoded through it, frame by frame."""
        h, w = self.frame_size(height, width)
        if (h, w) == (height, width):
            return None
        from PIL import Image

        resample = Image.Resampling(self.resample)
        return lambda image: image.resize((w, h), resample=resample)

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``(grid_t, grid_h, grid_w)`` of a video of ``num_frames`` (used) frames of ``height`` x ``width``."""
        h, w = self.frame_size(height, width)
        return -(-num_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        t, h, w = self.grid(num_frames, height, width)
        return t * h * w // self.merge_size ** 2

    def sample(self, total: int, video_fps: float | None) -> list[int]:
        """The indices of the frames used out of ``total``; ``video_fps`` is the file's rate (None for a list of
        frames, which uses every frame up to ``max_frames``)."""
        if total < 1:
            raise ValueError("a video without frames")
        cap = min(self.max_frames, total)
        if video_fps is None or video_fps <= 0:
            n = cap
        else:
            tp = self.temporal_patch_size
            n = min(max(total / video_fps * self.fps, self.min_frames), cap)
            n = math.floor(n / tp) * tp or cap  # fewer frames than one temporal patch: all of them
        return [int(k * total / n) for k in range(n)]

    # ---- pixels --------------------------------------------------------------------------------------

    def patches(self, frames: Sequence[Any]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One video's ``[grid_t*grid_h*grid_w, C*tp*p*p]`` float32 patches and its grid; ``frames`` are RGB PIL
        images of one size."""
        from PIL import Image

        if not frames:
            raise ValueError("a video without frames")
        width, height = frames[0].size
        if any(f.size != (width, height) for f in frames):
            raise ValueError(f"a video's frames differ in size ({sorted({f.size for f in frames})}); give frames of "
                             "one size")
        h, w = self.frame_size(height, width)
        arrays = []
        for f in frames:
            if (w, h) != (width, height):
                f = f.resize((w, h), resample=Image.Resampling(self.resample))
            arrays.append(np.asarray(f.convert("RGB"), dtype=np.uint8))
        x = np.stack(arrays).transpose(0, 3, 1, 2)  # [T, C, H, W]
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.do_rescale else x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if x.shape[0] % tp:
            x = np.concatenate([x, np.repeat(x[-1:], tp - x.shape[0] % tp, axis=0)])
        t, c = x.shape[0] // tp, x.shape[1]
        gh, gw = h // p, w // p
        # [t, tp, C, gh/m, m, p, gw/m, m, p] -> [t, gh/m, gw/m, m, m, C, tp, p, p]
        x = x.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(t * gh * gw, c * tp * p * p)), (t, gh, gw)

    def pixel_inputs(self, videos: Sequence[Sequence[Any]], video_processor: Any = None) -> dict[str, Any]:
        """``pixel_values_videos`` and ``video_grid_thw`` (torch tensors) for ``videos`` (each a list of PIL
        frames) in order; through transformers' ``video_processor`` when there is one, with this spec's sizes."""
        import torch

        if video_processor is not None:
            return self._transformers_inputs(videos, video_processor)
        rows, grids = zip(*(self.patches(v) for v in videos))
        return {"pixel_values_videos": torch.from_numpy(np.concatenate(rows)),
                "video_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def _transformers_inputs(self, videos: Sequence[Sequence[Any]], video_processor: Any) -> dict[str, Any]:
        arrays = [np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in v]) for v in videos]
        kwargs: dict[str, Any] = {"do_sample_frames": False, "return_tensors": "pt",
                                  "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}
        valid = getattr(getattr(video_processor, "valid_kwargs", None), "__annotations__", {})
        if "cap_pixels_per_frame" in valid:  # the per-video budget is off here as in our path (the default today)
            kwargs["cap_pixels_per_frame"] = False
        out = video_processor(videos=arrays, **kwargs)
        return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}

    def cache_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
