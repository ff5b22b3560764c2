"""Vision-language models: one family description per architecture, and its processor.

A :class:`ModelFamily` says where a model keeps its vision tower, its aligner (the projector from
vision features to the language model's width) and its language model, by module path. Freezing
(``--freeze_vit/--freeze_aligner/--freeze_llm``), per-part learning rates (``--vit_lr/--aligner_lr``)
and LoRA targets read only this, so they work for every registered family. Register another with
``MODEL_FAMILIES.register("name", ModelFamily(...))`` in a ``--external_plugins`` file.

The processor is built from its parts (tokenizer, image processor, and a video processor when one can
be loaded) rather than by ``AutoProcessor``: transformers' processors insist on a video processor class,
and video processors need torchvision, which does not install beside every torch (not beside 2.13 on
CPU). Images use the image processor's PIL/numpy path, which needs no torchvision.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lmforge.registry import MODEL_FAMILIES

logger = logging.getLogger(__name__)

GROUPS = ("vision_tower", "aligner", "language_model")


@dataclass(frozen=True)
class ModelFamily:
    """Where the parts of a vision-language model are (module paths of the unwrapped model)."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values
    vision_tower: tuple[str, ...]
    aligner: tuple[str, ...]  # may sit inside the vision tower (Qwen2-VL's merger): the longer path wins
    language_model: tuple[str, ...]  # with the output layer: --freeze_llm freezes both
    mrope: bool = False  # Qwen2-VL's multi-axis rotary positions (text, then time/height/width of images)
    token_type_ids: bool = False  # the forward takes mm_token_type_ids (0 text, 1 image, 2 video)
    pixels_knobs: bool = False  # --min_pixels/--max_pixels resize images (Qwen2-VL's dynamic resolution)

    def group_of(self, name: str) -> str | None:
        """``vision_tower``, ``aligner``, ``language_model`` or None for a parameter or module name."""
        name = _strip_wrappers(name)
        best, best_len = None, -1
        for group in GROUPS:
            for prefix in getattr(self, group):
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = group, len(prefix)
        return best


_WRAPPERS = ("base_model.model.", "_orig_mod.", "module.")


def _strip_wrappers(name: str) -> str:
    """Parameter names of a model wrapped by peft, torch.compile or DDP, as the plain model names them."""
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w):], True
    return name


_QWEN_VL = dict(vision_tower=("model.visual",), aligner=("model.visual.merger",),
                language_model=("model.language_model", "lm_head"), mrope=True, token_type_ids=True,
                pixels_knobs=True)
for _family in (
    ModelFamily("qwen2_vl", ("qwen2_vl",), **_QWEN_VL),
    ModelFamily("qwen2_5_vl", ("qwen2_5_vl",), **_QWEN_VL),
    ModelFamily("llava", ("llava",), vision_tower=("model.vision_tower",), aligner=("model.multi_modal_projector",),
                language_model=("model.language_model", "lm_head")),
):
    MODEL_FAMILIES.register(_family.name, _family)


def is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def family_of(config: Any) -> ModelFamily | None:
    """The registered family of a model's config, or None (a text model, or an unregistered VL model)."""
    model_type = getattr(config, "model_type", None)
    for name in MODEL_FAMILIES.names():
        family = MODEL_FAMILIES.get(name)
        if model_type in family.model_types:
            return family
    return None


def require_family(model: Any) -> ModelFamily | None:
    """The family of a model (None for a text model); a VL model of no registered family is an error."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(base.config)
    if family is None and is_vision_config(base.config):
        raise ValueError(f"model type {base.config.model_type!r} is a vision-language model with no registered "
                         f"family (known: {', '.join(MODEL_FAMILIES.names())}); register a "
                         "lmforge.model.vision.ModelFamily for it with --external_plugins")
    return family


def named_parameters_by_group(model: Any, family: ModelFamily) -> Iterator[tuple[str, str | None, Any]]:
    """``(name, group, parameter)`` for every parameter of ``model`` (peft-wrapped or not)."""
    for name, p in model.named_parameters():
        yield name, family.group_of(name), p


def frozen_groups(args: Any) -> set[str]:
    """The groups ``--freeze_vit/--freeze_aligner/--freeze_llm`` freeze."""
    flags = {"vision_tower": "freeze_vit", "aligner": "freeze_aligner", "language_model": "freeze_llm"}
    return {g for g, flag in flags.items() if getattr(args, flag, False)}


def linear_targets(model: Any, family: ModelFamily, groups: set[str], names: list[str] | None = None) -> str:
    """A peft ``target_modules`` regex: the linear layers of ``groups`` (only those named ``names`` when given),
    never the output layer."""
    import re

    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and family.group_of(name) in groups:
            if not names or name.split(".")[-1] in names:
                found.append(name)
    if not found:
        raise ValueError(f"LoRA: no linear layer{' named ' + ', '.join(names) if names else ''} in the "
                         f"{', '.join(sorted(groups)) or 'no'} part(s) of this {family.name} model to adapt "
                         "(check --target_modules and --freeze_vit/--freeze_aligner/--freeze_llm)")
    return "^(" + "|".join(re.escape(n) for n in found) + ")$"


# ----------------------------------------------------------------------------- processor


@functools.cache
def _processor_class(cls: type) -> type:
    """``cls`` that accepts a missing video processor and saves the parts it has."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else cls.check_argument_for_proper_class(self, argument_name, argument)

    def save_pretrained(self, save_directory, **kwargs):
        for part in ("tokenizer", "image_processor", "video_processor"):
            if getattr(self, part, None) is not None:
                getattr(self, part).save_pretrained(save_directory)
        return [str(save_directory)]

    pad_token_id = property(lambda self: self.tokenizer.pad_token_id)  # the Trainer counts tokens with it
    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                       "save_pretrained": save_pretrained, "pad_token_id": pad_token_id,
                                       "__module__": cls.__module__})


def _video_processor(model_dir: Path) -> Any:
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        return None
    try:
        from transformers import AutoVideoProcessor

        return AutoVideoProcessor.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - a model without videos: images still work
        logger.info("no video processor for %s (%s)", model_dir, e)
        return None


def load_processor(model_dir: str | Path, config: Any, tokenizer: Any, *, min_pixels: int | None = None,
                   max_pixels: int | None = None, trust_remote_code: bool = False, video_fps: float | None = None,
                   video_max_frames: int | None = None) -> Any:
    """The processor of a vision-language model folder (None for a text model).

    ``min_pixels``/``max_pixels`` bound each image's area for families that resize dynamically
    (Qwen2-VL): larger images are scaled down, so one large image cannot blow up a batch.
    ``video_fps``/``video_max_frames`` say which frames of a video are used; with the folder's video
    config (read as JSON: transformers' video processor needs torchvision) they go on the processor as
    ``video_options`` for :class:`lmforge.template.video.VideoSpec`.
    """
    if not is_vision_config(config):
        return None
    from transformers import AutoImageProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_dir = Path(model_dir)
    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"no transformers processor is known for model type {config.model_type!r}")
    import transformers

    cls = _processor_class(getattr(transformers, name))
    image_processor = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    family = family_of(config)
    if min_pixels or max_pixels:
        if family is None or not family.pixels_knobs:
            logger.warning("--min_pixels/--max_pixels: %s resizes images to a fixed size; ignored",
                           config.model_type)
        else:
            from transformers.image_utils import SizeDict

            size = dict(shortest_edge=image_processor.size.shortest_edge, longest_edge=image_processor.size.longest_edge)
            if min_pixels:
                size["shortest_edge"] = int(min_pixels)
            if max_pixels:
                size["longest_edge"] = int(max_pixels)
            if size["shortest_edge"] > size["longest_edge"]:
                raise ValueError(f"--min_pixels {size['shortest_edge']} is larger than --max_pixels "
                                 f"{size['longest_edge']}")
            image_processor.size = SizeDict(**size)
    extra: dict[str, Any] = {}
    saved = model_dir / "processor_config.json"
    if saved.is_file():  # e.g. LLaVA's patch_size and feature strategy
        params = inspect.signature(cls.__init__).parameters
        extra = {k: v for k, v in json.loads(saved.read_text(encoding="utf-8")).items() if k in params}
    parts = {"image_processor": image_processor, "tokenizer": tokenizer}
    if "video_processor" in inspect.signature(cls.__init__).parameters:
        parts["video_processor"] = _video_processor(model_dir)
    processor = cls(**parts, chat_template=getattr(tokenizer, "chat_template", None), **extra)
    processor.video_options = {"config": _video_config(model_dir), "fps": video_fps, "max_frames": video_max_frames,
                               # Qwen2.5-VL: rotary time positions per second of video (scales a video's time axis)
                               "tokens_per_second": getattr(getattr(config, "vision_config", None),
                                                            "tokens_per_second", None)}
    return processor


def _video_config(model_dir: Path) -> dict | None:
    """The folder's video processor settings (``processor_config.json``'s ``video_processor``, else
    ``video_preprocessor_config.json``), None when it has none (its image processor's settings then apply)."""
    nested = model_dir / "processor_config.json"
    if nested.is_file():
        video = json.loads(nested.read_text(encoding="utf-8")).get("video_processor")
        if isinstance(video, dict):
            return video
    path = model_dir / "video_preprocessor_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def get_processor(model: str, config: Any, tokenizer: Any, *, hub: str = "hf", revision: str | None = None,
                  min_pixels: int | None = None, max_pixels: int | None = None,
                  trust_remote_code: bool = False, video_fps: float | None = None,
                  video_max_frames: int | None = None) -> Any:
    """:func:`load_processor` for a model name (hub id, folder, ``builtin:tiny-vl``); None for a text model."""
    if not is_vision_config(config):
        return None
    from lmforge.model.hub import resolve_model_dir

    return load_processor(resolve_model_dir(model, hub=hub, revision=revision), config, tokenizer,
                          min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code,
                          video_fps=video_fps, video_max_frames=video_max_frames)


def mrope_position_ids(input_ids: Any, text_positions: Any, image_grid_thw: Any, image_token_id: int,
                       merge_size: int, *, video_grid_thw: Any = None, video_token_id: int | None = None,
                       video_time_scales: Any = None) -> Any:
    """Qwen2-VL's rotary positions ``[3, L]`` (time, height, width) for a flat sequence of packed rows.

    Each row (where ``text_positions`` restarts at 0) is laid out as the model lays out one sequence:
    text tokens advance all three axes by one; an image's or video's tokens take its grid's frame (Qwen2-VL:
    the temporal patch's index), row and column, offset by the position before it, and the text after it
    resumes past the grid's larger side. Image and video grids are consumed in order, each from its own
    list. ``video_time_scales`` (Qwen2.5-VL: ``tokens_per_second * second_per_grid_ts`` of each video) spaces a
    video's temporal patches that many positions apart, truncated to integers as the model does; None: 1.
    For packing, where the model cannot compute this itself.
    """
    import torch

    ids = input_ids.tolist()
    out = torch.zeros(3, len(ids), dtype=torch.long)
    grids = {image_token_id: iter(image_grid_thw.tolist() if image_grid_thw is not None else [])}
    if video_token_id is not None:
        grids[video_token_id] = iter(video_grid_thw.tolist() if video_grid_thw is not None else [])
    scales = iter([float(x) for x in video_time_scales] if video_time_scales is not None else [])
    k, pos = 0, 0
    restarts = text_positions.tolist()
    while k < len(ids):
        if restarts[k] == 0:
            pos = 0
        token = ids[k]
        if token not in grids:
            out[:, k] = pos
            pos, k = pos + 1, k + 1
            continue
        grid = next(grids[token], None)
        if grid is None:
            raise ValueError(f"position {k}: more {'video' if token == video_token_id else 'image'} blocks than "
                             "grids")
        t, h, w = grid
        gh, gw = h // merge_size, w // merge_size
        n = t * gh * gw
        if ids[k:k + n] != [token] * n:
            raise ValueError(f"a grid of {t}x{h}x{w} needs {n} consecutive tokens {token} at position {k}")
        frames = torch.arange(t)
        if token == video_token_id and video_time_scales is not None:
            frames = (frames * next(scales)).long()
        tt, hh, ww = torch.meshgrid(frames, torch.arange(gh), torch.arange(gw), indexing="ij")
        out[:, k:k + n] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
        pos, k = pos + max(gh, gw), k + n
    return out
