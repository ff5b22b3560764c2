"""Model, data and template argument groups shared by every command."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import field


@dataclass
class ModelArguments:
    """Which model to load and how."""

    model: Optional[str] = field(None, "hub id (Qwen/Qwen2.5-0.5B-Instruct), local folder, or builtin:tiny")
    hub: Literal["hf", "modelscope"] = field("hf", "where hub ids are downloaded from")
    revision: Optional[str] = field(None, "hub revision (branch, tag or commit)")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", "weights dtype; auto = the checkpoint's dtype on GPU, float32 on CPU")
    attn_impl: Optional[str] = field(None, "attention kernel: sdpa, eager, flash_attention_2, flex_attention")
    device_map: Optional[str] = field(None, "transformers device_map (auto, cpu, cuda:0)")
    model_kwargs: dict = field(default_factory=dict, help="extra from_pretrained kwargs as JSON")
    trust_remote_code: bool = field(False, "allow custom modelling code from the hub")
    external_plugins: list[str] = field(default_factory=list,
                                        help="Python files that register templates, datasets, losses, ...")


@dataclass
class DataArguments:
    """Which data to use and how to read it."""

    dataset: list[str] = field(default_factory=list,
                               help="files, folders, hub ids or builtin:NAME; name#N sub-samples N rows")
    val_dataset: list[str] = field(default_factory=list, help="validation datasets (same syntax)")
    split_dataset_ratio: float = field(0.0, "fraction of the training data held out for validation")
    columns: dict = field(default_factory=dict, help='column renames as JSON, e.g. \'{"src": "dst"}\'')
    strict: bool = field(True, "fail on a malformed row (false: skip it and count it in the log)")
    streaming: bool = field(False, "read datasets lazily (no shuffle buffer beyond the first pass)")
    dataset_num_proc: int = field(1, "processes for preprocessing and encoding")
    data_seed: int = field(42, "seed for shuffling and sub-sampling data")
    model_name: list[str] = field(default_factory=list,
                                  help="the model's name for builtin:self-cognition (one, or Chinese then English)")
    model_author: list[str] = field(default_factory=list,
                                    help="the model's author for builtin:self-cognition (one, or Chinese then English)")


@dataclass
class TemplateArguments:
    """How conversations become tokens."""

    template: Optional[str] = field(None, "registered template name; default: derived from the tokenizer's chat template")
    system: Optional[str] = field(None, "system prompt to set or override")
    max_length: Optional[int] = field(2048, "longest encoded sequence in tokens")
    truncation_strategy: Literal["left", "right", "delete", "raise"] = field(
        "delete", "what to do with a row longer than max_length")
    loss_scale: str = field("default", "which tokens carry loss: 'default' (assistant turns), last_round, all, ...")
    enable_thinking: Optional[bool] = field(None, "thinking on/off for templates that support it")
    agent_template: Optional[str] = field(None, "agent template for tool calls (hermes, react_en, ...)")
    max_pixels: Optional[int] = field(None, "vision models: most pixels per image; larger images are scaled down "
                                            "(Qwen2-VL: e.g. 602112 = 768*28*28); default: the processor's")
    min_pixels: Optional[int] = field(None, "vision models: fewest pixels per image; smaller ones are scaled up")
    video_fps: Optional[float] = field(None, "vision models: frames per second of a video file that are used, evenly "
                                             "spaced, at least 4 (default 2.0 as Qwen2-VL's processor; infer: the "
                                             "training run's)")
    video_max_frames: Optional[int] = field(None, "vision models: most frames used per video, a file's or a list's "
                                                  "(thinned evenly; default 64; infer: the training run's); two "
                                                  "frames cost one frame's tokens in Qwen2-VL")
