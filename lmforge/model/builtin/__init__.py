"""The built-in tiny models: ``builtin:tiny`` and ``builtin:tiny-vl``.

A Qwen2-architecture causal LM with random weights drawn from a fixed seed, and a byte-level BPE
tokenizer that ships inside the package (trained here by ``build_tokenizer.py``; digits split one
by one as Qwen's tokenizer does; ChatML chat template). On first use the model is written to a
cache folder with ``save_pretrained`` and from then on it is loaded like any local checkpoint, so
save, reload, merge and serve treat it exactly as a hub model.

``builtin:tiny-vl`` is a Qwen2-VL-architecture model (vision tower, merger, language model) of about
two million parameters with the same tokenizer plus Qwen2-VL's vision tokens, a ChatML template that
renders image and video content parts, and Qwen2-VL's image processor (PIL path) sized for small
images (56x56 to 112x112 pixels: 4 to 16 image tokens).
"""
from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
BUILTIN_PREFIX = "builtin:"

# Sized to train on two CPU cores in minutes (about 1.2M parameters with tied embeddings).
_TINY_TEXT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    seed=0,
)
MODEL_SPECS: dict[str, dict] = {
    "tiny": _TINY_TEXT,
    # the same language model behind a 4-block vision tower (about 1.9M parameters in all)
    "tiny-vl": dict(_TINY_TEXT, vision=dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2, patch_size=14,
                                            spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
                    min_pixels=56 * 56, max_pixels=112 * 112),
}
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Image and video content parts render as Qwen2-VL does: start, one pad token (expanded by the processor), end.
_RENDER_PARTS = (
    "{%- macro render(content) -%}"
    "{%- if content is string or content is none -%}{{ content or '' }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type in ('image', 'image_url') or 'image' in part -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type in ('video', 'video_url') or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part -%}{{ part.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def is_builtin(name: str | None) -> bool:
    return bool(name) and str(name).startswith(BUILTIN_PREFIX)


def builtin_model_dir(name: str) -> Path:
    """Materialise ``builtin:<name>`` on disk (once) and return its folder."""
    key = name[len(BUILTIN_PREFIX):] if is_builtin(name) else name
    if key not in MODEL_SPECS:
        import difflib

        close = difflib.get_close_matches(key, list(MODEL_SPECS), n=1)
        hint = f" Did you mean 'builtin:{close[0]}'?" if close else ""
        raise ValueError(f"unknown built-in model {name!r}.{hint} Known: "
                         + ", ".join(f"builtin:{k}" for k in MODEL_SPECS))
    from lmforge import __version__

    out = cache_root() / "models" / f"{key}-v{__version__}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    _write_builtin(key, out)
    return out


def _write_builtin(key: str, out: Path) -> None:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if key == "tiny-vl":
        return _save_atomically(key, out, *_build_tiny_vl(MODEL_SPECS[key]))
    spec = dict(MODEL_SPECS[key])
    seed = spec.pop("seed")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    rope_theta = spec.pop("rope_theta")
    config = Qwen2Config(
        vocab_size=len(tok),
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        torch_dtype="float32",
        **spec,
    )
    _save_atomically(key, out, _seeded(Qwen2ForCausalLM, config, seed, tok), tok)


def _seeded(model_cls, config, seed: int, tok):
    """``model_cls(config)`` from a seeded CPU generator (the same weights on every machine), stopping at
    ChatML's end of turn."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"),
                                            tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _build_tiny_vl(spec: dict):
    """The random-init Qwen2-VL model, its tokenizer and its image processor."""
    from transformers import Qwen2VLForConditionalGeneration

    spec = dict(spec)
    seed, vision, rope_theta = spec.pop("seed"), spec.pop("vision"), spec.pop("rope_theta")
    min_pixels, max_pixels = spec.pop("min_pixels"), spec.pop("max_pixels")
    tok = vl_tokenizer()
    config = qwen2_vl_config(tok, spec, vision, rope_theta=rope_theta)
    return (_seeded(Qwen2VLForConditionalGeneration, config, seed, tok), tok,
            qwen2_vl_image_processor(min_pixels, max_pixels))


def qwen2_vl_image_processor(min_pixels: int, max_pixels: int):
    """Qwen2-VL's image processor on its PIL/numpy path (torchvision is not needed): ``Qwen2VLImageProcessorPil``
    where transformers has split the PIL classes out, else ``Qwen2VLImageProcessor``."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:
        from transformers import Qwen2VLImageProcessor as cls
    return cls(min_pixels=min_pixels, max_pixels=max_pixels)


def vl_tokenizer():
    """The built-in tokenizer plus Qwen2-VL's vision tokens, with a ChatML template that renders image parts."""
    from transformers import AutoTokenizer

    from lmforge.model.builtin.build_tokenizer import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = _RENDER_PARTS + CHATML_TEMPLATE.replace("message['content']", "render(message['content'])") \
        .replace("messages[0]['content']", "render(messages[0]['content'])") \
        .replace("'\\n' + message.content", "'\\n' + render(message.content)")
    return tok


def qwen2_vl_config(tok, text: dict, vision: dict, *, rope_theta: float, vocab_size: int | None = None,
                    mrope_section: list[int] | None = None, torch_dtype: str = "float32"):
    """A ``Qwen2VLConfig`` of the given language-model (``text``) and vision-tower (``vision``) shapes whose
    special-token ids are ``tok``'s (:func:`vl_tokenizer`); ``vocab_size`` defaults to ``len(tok)``, the rotary
    split over time/height/width (``mrope_section``) to thirds of the head's rotary pairs."""
    from transformers import Qwen2VLConfig

    vocab_size = vocab_size or len(tok)
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size {vocab_size} does not cover the tokenizer's {len(tok)} ids")
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    third = head_dim // 2 // 3  # rotary pairs split over time, height and width
    mrope_section = mrope_section or [head_dim // 2 - 2 * third, third, third]
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must add up to head_dim / 2 = {head_dim // 2}")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    text = dict(text, vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                 "mrope_section": list(mrope_section)})
    return Qwen2VLConfig(
        text_config=text, vision_config=dict(dict(hidden_size=text["hidden_size"]), **vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=eos, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=text["tie_word_embeddings"], torch_dtype=torch_dtype)


def _save_atomically(key: str, out: Path, *parts) -> None:
    """Write beside the target and rename: two processes racing here never see half a model."""
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
    for part in parts:
        part.save_pretrained(tmp)
    from lmforge.utils.io import apply_umask

    apply_umask(tmp)  # mkdtemp made it 0700 and safetensors writes 0600: give it the user's umask
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
