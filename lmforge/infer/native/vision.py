"""Images and videos in the native engine (Qwen2-VL, Qwen2.5-VL; videos: Qwen2-VL only, as the template
refuses Qwen2.5-VL's): the vision tower's embeddings and M-RoPE positions per request.

What differs from a text prompt, and where it is handled:

- embeddings: the model's own vision tower (and merger) runs once per request, at the first prompt chunk
  that reaches an image or video token: its image features for the images, its video features (the same
  tower over the videos' patches and grids) for the videos. Image rows take the image features in order and
  video rows the video features (as transformers' two ``masked_scatter`` calls do), so a chunked prefill takes
  the rows of its own chunk, of either kind;
- positions: Qwen2-VL's rotary positions are 3-D (time, height, width). Prompt tokens take the positions
  the model's ``get_rope_index`` gives (:func:`lmforge.model.vision.mrope_position_ids`, with the image and
  the video grids; a video's time axis is its temporal patch index); every later token (and every text token
  after the last image or video) has the same value on all three axes, ``index + delta``, which is ordinary
  1-D RoPE, so decode steps (and their CUDA graphs) use the usual table. A step with any token whose axes
  differ gets per-token cos/sin instead;
- prefix cache: image and video tokens are the same placeholder ids whatever the pixels, so the request's
  digest of its pixels (images and videos) salts the hash of its first block (and so of every block after it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

# families whose vision tower and M-RoPE the native engine runs (each checked against the hf engine)
SUPPORTED = ("qwen2_vl", "qwen2_5_vl")


def check_supported(model: Any) -> None:
    """Refuse a vision-language model whose family the native engine does not implement, with what to do."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", "?")
    if model_type not in SUPPORTED:
        raise NotImplementedError(
            f"the native engine does not support the vision-language model family {model_type!r} yet "
            f"(it runs {', '.join(SUPPORTED)}); use --infer_backend hf")


def check_adapters(model: Any) -> None:
    """LoRA is applied per token in the language model only; the vision tower runs through transformers with
    one adapter at a time, so adapters that change it are refused rather than mixed up between requests."""
    from lmforge.infer.native.model import UnsupportedModelError

    touched = sorted({n for name, module in model.named_modules() for n in (getattr(module, "lora_A", None) or {})
                      if ".visual." in f".{name}"})
    if touched:
        raise UnsupportedModelError(f"adapter(s) {', '.join(touched)} change the vision tower, which the native engine "
                                    "runs without per-request adapters; merge them (`lmforge export --merge_lora "
                                    "true`) or use --infer_backend hf")


@dataclass(eq=False)
class RequestMedia:
    """One request's images and videos, shared by its ``n`` sequences: pixels, their digest, the prompt's
    positions, and the tower's output while a prompt chunk still needs it.

    Qwen2-VL's image and video tokens are different placeholder ids embedded by the same tower (with each
    kind's own grids); ``rows`` lists both kinds in prompt order, so a chunk takes its rows whatever their kind.
    """

    pixel_values: torch.Tensor | None  # images' patches (None: no images)
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None  # videos' patches (None: no videos)
    video_grid_thw: torch.Tensor | None
    digest: int  # salts the first KV block's hash
    positions: torch.Tensor  # [3, prompt_len] long, on the host
    delta: int  # position of token i >= prompt_len (and of text after the last image) is i + delta
    rows: torch.Tensor  # [num image + video tokens] prompt indices of the image and video tokens, ascending
    is_video: torch.Tensor  # [len(rows)] bool: that row is a video token
    flat_from: int  # prompt indices >= this have equal axes (1-D RoPE at index + delta)
    embeds: torch.Tensor | None = None  # [len(rows), hidden] on the device, computed on demand

    @classmethod
    def build(cls, prompt_ids: list[int], pixels: dict[str, torch.Tensor], image_token_id: int, merge_size: int,
              video_token_id: int | None = None, video_time_scales: Any = None) -> RequestMedia:
        from lmforge.model.vision import mrope_position_ids

        ids = torch.tensor(prompt_ids, dtype=torch.long)
        grid, vgrid = pixels.get("image_grid_thw"), pixels.get("video_grid_thw")
        pos = mrope_position_ids(ids, torch.arange(len(ids)), grid, image_token_id, merge_size,
                                 video_grid_thw=vgrid, video_token_id=video_token_id if vgrid is not None else None,
                                 video_time_scales=video_time_scales)
        delta = int(pos.max()) + 1 - len(ids)
        is_image = ids == image_token_id
        is_video = (ids == video_token_id) if vgrid is not None else torch.zeros_like(is_image)
        rows = (is_image | is_video).nonzero().flatten()
        flat = (pos == pos[0]).all(0) & (pos[0] == torch.arange(len(ids)) + delta)
        bad = (~flat).nonzero().flatten()
        pv, pvv = pixels.get("pixel_values"), pixels.get("pixel_values_videos")
        h = hashlib.blake2b(digest_size=8)
        if video_time_scales is not None:  # equal pixels at another frame rate: other positions, other keys
            h.update(repr([float(x) for x in video_time_scales]).encode())
        for kind, values, g in ((b"image", pv, grid), (b"video", pvv, vgrid)):  # the kind too: equal bytes, other ids
            if values is not None:
                h.update(kind)
                h.update(values.detach().float().contiguous().cpu().numpy().tobytes())
                h.update(g.cpu().numpy().astype("int64").tobytes())
        return cls(pixel_values=pv, image_grid_thw=grid, pixel_values_videos=pvv, video_grid_thw=vgrid,
                   digest=int.from_bytes(h.digest(), "little"), positions=pos, delta=delta, rows=rows,
                   is_video=is_video[rows], flat_from=int(bad[-1]) + 1 if len(bad) else 0)

    def rope_positions(self, start: int, n: int) -> torch.Tensor | None:
        """[3, n] positions of tokens ``start..start+n-1``, or None when 1-D ``index + delta`` is exact for them."""
        if start >= self.flat_from:
            return None
        idx = torch.arange(start, start + n)
        out = (idx + self.delta).expand(3, n).clone()
        inside = idx < self.positions.shape[1]
        out[:, inside] = self.positions[:, idx[inside]]
        return out

    def chunk_embeds(self, start: int, n: int, encode: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(offsets within the chunk, embedding rows) of the image and video tokens among tokens
        ``start..start+n-1``."""
        lo = int(torch.searchsorted(self.rows, start))
        hi = int(torch.searchsorted(self.rows, start + n))
        if lo == hi:
            return None
        if self.embeds is None:
            self.embeds = self._embed(encode)
        return self.rows[lo:hi] - start, self.embeds[lo:hi]

    def _embed(self, encode: Any) -> torch.Tensor:
        """Every image and video token's embedding in prompt order: image rows take the image features in order,
        video rows the video features (as the model's two ``masked_scatter`` calls place them)."""
        kinds = [(self.pixel_values, self.image_grid_thw, False), (self.pixel_values_videos, self.video_grid_thw, True)]
        feats = {video: encode(pv, grid, video=video) for pv, grid, video in kinds if pv is not None}
        first = next(iter(feats.values()))
        out = torch.empty(len(self.rows), first.shape[-1], dtype=first.dtype, device=first.device)
        for video, f in feats.items():
            mask = (self.is_video == video).to(f.device)
            if int(mask.sum()) != f.shape[0]:
                raise ValueError(f"the prompt holds {int(mask.sum())} {'video' if video else 'image'} tokens but "
                                 f"its pixels give {f.shape[0]} features")
            out[mask] = f
        return out

    def release(self, computed: int) -> None:
        """Free the tower's output once the prompt's image and video tokens are all in the cache (a preempted
        sequence that needs them again recomputes them)."""
        if self.embeds is not None and (not len(self.rows) or computed > int(self.rows[-1])):
            self.embeds = None


def vision_encoder(model: Any) -> Any:
    """``encode(pixels, grid_thw, video=False) -> [tokens, hidden]`` through the model's own tower (its image or
    video features)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    @torch.inference_mode()
    def encode(pixels: torch.Tensor, grid: torch.Tensor, video: bool = False) -> torch.Tensor:
        dev = base.device
        features = base.get_video_features if video else base.get_image_features
        out = features(pixels.to(dev), grid.to(dev))
        out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object, 4 the per-item tuple
        return out if torch.is_tensor(out) else torch.cat(list(out), dim=0)

    return encode


def mrope_cos_sin(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, sections: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin [T, D] for 3-D ``positions`` [3, T] from the 1-D tables [max_len, D]: rotary
    frequency ``j`` (of each half) takes the axis of the section it falls in, as Qwen2-VL composes them."""
    half = cos.shape[-1] // 2
    if sum(sections) != half:
        raise ValueError(f"mrope_section {sections} does not add up to half the head dim ({half})")
    axis = torch.cat([torch.full((s,), i % 3, dtype=torch.long) for i, s in enumerate(sections)])
    axis = torch.cat([axis, axis]).to(positions.device)  # [D]
    cols = torch.arange(cos.shape[-1], device=positions.device)
    rows = positions[axis].T  # [T, D]: the position each (token, frequency) reads
    return cos[rows, cols], sin[rows, cols]
