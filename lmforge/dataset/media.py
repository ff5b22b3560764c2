"""Images (and video frames) of canonical rows: references checked when rows are read, pixels read when batches are built.

A row's image may arrive as a local path (relative to the dataset file's folder, else to the working
directory), a ``file://`` URL, a base64 ``data:`` URL, a PIL image, raw bytes, or a Hugging Face
``Image`` feature value (``{"bytes": ..., "path": ...}``). :func:`normalize_image` turns each into one
string the Arrow row keeps: an absolute path or a ``data:`` URL (PIL images become PNG data URLs), after
opening its header, so that a missing or unreadable image fails while the row's file and line are
known. Remote ``http(s)://`` URLs are refused: lmforge reads media offline (download them first).

A video is a list of frame images (each normalised as above). Video files are not decoded here: the
only decoders are optional packages, and transformers' video processors need torchvision, which does
not install beside this torch; give frames instead.

Why by hand: PIL opens the files; what is written here is the policy (which references are accepted,
where relative paths point, what an error says).
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import os
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_TAG", "VIDEO_TAG", "MediaError", "count_tags", "data_url", "image_size", "normalize_image",
           "normalize_video", "open_image", "openai_messages", "source_dir"]

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v")


class MediaError(ValueError):
    """An image reference that cannot be used; the message says which and why."""


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency; say so if it was removed
        raise MediaError("images need Pillow: pip install pillow") from None
    return Image


@functools.lru_cache(maxsize=256)
def _is_file(path: str) -> bool:
    return os.path.isfile(path)


def source_dir(source: str | None) -> Path | None:
    """The folder of the dataset file a row came from (``data/a.jsonl:12`` -> ``data``), if it is a file."""
    if not source:
        return None
    path = source.rsplit(":", 1)[0]
    return Path(path).expanduser().resolve().parent if _is_file(path) else None


def count_tags(text: str | None, tag: str = IMAGE_TAG) -> int:
    return text.count(tag) if isinstance(text, str) else 0


def data_url(image: Any, fmt: str = "PNG") -> str:
    """A PIL image as a base64 ``data:`` URL (PNG: lossless)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bytes_url(raw: bytes) -> str:
    """Raw image bytes as a data URL of their own format (no re-encoding)."""
    fmt = _open_bytes(raw).format or "png"
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode("ascii")


def _open_bytes(raw: bytes):
    try:
        return _pil().open(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 - PIL raises several types for bytes that are not an image
        raise MediaError(f"the bytes are not an image PIL can read ({type(e).__name__}: {e})") from None


def _decode_data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise MediaError(f"malformed data URL {url[:40]!r}...: expected data:image/<type>;base64,<data>")
    if ";base64" not in head:
        raise MediaError(f"data URL {head!r} is not base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URL {head!r}: the base64 payload does not decode ({e})") from None


def _local_path(ref: str, base_dir: Path | None) -> str:
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    path = Path(ref).expanduser()
    if not path.is_absolute():
        candidates = ([base_dir / path] if base_dir is not None else []) + [Path.cwd() / path]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        where = f" (looked in {base_dir} and the working directory)" if base_dir is not None else ""
        raise MediaError(f"no such image file {ref!r}{where}")
    return str(path.resolve())


def _check_header(path_or_bytes: str | bytes, what: str) -> tuple[int, int]:
    Image = _pil()
    try:
        src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        with Image.open(src) as im:
            w, h = im.size
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - unidentified, truncated, permission denied ...
        raise MediaError(f"cannot read image {what}: {type(e).__name__}: {e}") from None
    if w < 1 or h < 1:
        raise MediaError(f"image {what} is empty ({w}x{h})")
    return h, w


def normalize_image(value: Any, base_dir: Path | None = None) -> str:
    """One image reference -> an absolute path or a ``data:`` URL, checked to open; :class:`MediaError` if not."""
    if isinstance(value, dict):  # a Hugging Face Image feature value
        if value.get("bytes"):
            value = bytes(value["bytes"])
        elif value.get("path"):
            value = value["path"]
        else:
            raise MediaError(f"an image object needs 'bytes' or 'path', got keys {sorted(value)}")
    if isinstance(value, (bytes, bytearray)):
        return _bytes_url(bytes(value))
    if hasattr(value, "save") and hasattr(value, "size") and not isinstance(value, str):  # a PIL image
        return data_url(value)
    if not isinstance(value, str) or not value.strip():
        raise MediaError(f"expected an image path, file:// or data: URL, or PIL image; got {type(value).__name__}")
    ref = value.strip()
    low = ref[:8].lower()
    if low.startswith(("http://", "https://")):
        raise MediaError(f"remote image URL {ref[:120]!r}: lmforge reads media offline; download it and give the "
                         "local path (or a base64 data: URL)")
    if low.startswith("data:"):
        _check_header(_decode_data_url(ref), "in the data URL")
        return ref
    path = _local_path(ref, base_dir)
    _check_header(path, repr(path))
    return path


def normalize_video(value: Any, base_dir: Path | None = None) -> list[str]:
    """A video as a list of frame references (each normalised as an image)."""
    if isinstance(value, str) and value.lower().endswith(VIDEO_SUFFIXES):
        raise MediaError(f"video file {value!r}: video files are not decoded by lmforge; give the video as a list "
                         "of frame images")
    if not isinstance(value, (list, tuple)) or not value:
        raise MediaError(f"expected a video as a non-empty list of frame images, got {type(value).__name__}")
    return [normalize_image(v, base_dir) for v in value]


def _source(ref: str):
    return io.BytesIO(_decode_data_url(ref)) if ref.startswith("data:") else ref


@functools.lru_cache(maxsize=4096)
def image_size(ref: str) -> tuple[int, int]:
    """``(height, width)`` of a normalised image, from its header."""
    Image = _pil()
    try:
        with Image.open(_source(ref)) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot read image {ref[:80]!r}: {type(e).__name__}: {e}") from None
    return h, w


def open_image(ref: str):
    """The decoded RGB image of a normalised reference (a path, ``file://`` or ``data:`` URL)."""
    Image = _pil()
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if ref[:8].lower().startswith(("http://", "https://")):
        raise MediaError(f"remote image URL {ref[:120]!r}: lmforge reads media offline")
    try:
        with Image.open(_source(ref)) as im:
            return im.convert("RGB")
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot read image {ref[:80]!r}: {type(e).__name__}: {e}") from None


def openai_messages(messages: list[dict], images: list[str]) -> list[dict]:
    """Messages with ``<image>`` tags as OpenAI content parts (images sent as base64 data: URLs), for a server."""
    it = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or IMAGE_TAG not in content:
            out.append(m)
            continue
        parts: list[dict] = []
        for k, piece in enumerate(content.split(IMAGE_TAG)):
            if k:
                ref = next(it)
                url = ref if ref.startswith("data:") else data_url(open_image(ref))
                parts.append({"type": "image_url", "image_url": {"url": url}})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({**m, "content": parts})
    return out
