"""Images (and video frames) of canonical rows: references checked when rows are read, pixels read when batches are built.

A row's image may arrive as a local path (relative to the dataset file's folder, else to the working
directory), a ``file://`` URL, a base64 ``data:`` URL, a PIL image, raw bytes, or a Hugging Face
``Image`` feature value (``{"bytes": ..., "path": ...}``). :func:`normalize_image` turns each into one
string the Arrow row keeps: an absolute path or a ``data:`` URL (PIL images become PNG data URLs), after
opening its header, so that a missing or unreadable image fails while the row's file and line are
known. Remote ``http(s)://`` URLs are refused: lmforge reads media offline (download them first).

A video is a list of frame images (each normalised as above, all of one size), or a video file (a path
with a video suffix such as ``.mp4``, or a ``data:video/...`` URL) decoded with PyAV (``pip install av``;
transformers' own video decoding goes through torchvision, which has no CPU build for our torch). A file is
opened and its first frame decoded when the row is read, and it is kept as a one-element list holding its
absolute path or data URL (:func:`is_video_file` tells the two kinds apart); :func:`video_info` reads its
frame count, rate and size from the container, and :func:`read_video` decodes the frames a batch uses.

Why by hand: PIL opens the files; what is written here is the policy (which references are accepted,
where relative paths point, what an error says).
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_TAG", "VIDEO_TAG", "MediaError", "count_tags", "data_url", "image_size", "is_video_file",
           "normalize_image", "normalize_video", "open_image", "openai_messages", "read_video", "ref_cache",
           "source_dir", "video_info"]

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".ts", ".3gp", ".wmv")


class MediaError(ValueError):
    """An image reference that cannot be used; the message says which and why."""


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency; say so if it was removed
        raise MediaError("images need Pillow: pip install pillow") from None
    return Image


def ref_cache(maxsize: int):
    """``functools.lru_cache`` for functions of media references that skips calls naming a ``data:`` URL: a
    served request's URL is up to the body limit (16 MiB), and a cache keyed by it would keep thousands of them
    alive after their requests; files (training rows) are the references worth caching."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        def _inline(value: Any) -> bool:
            if isinstance(value, str):
                return value.startswith("data:")
            return isinstance(value, tuple) and any(isinstance(v, str) and v.startswith("data:") for v in value)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args) if any(_inline(a) for a in args) else cached(*args)

        call.cache_clear, call.cache_info = cached.cache_clear, cached.cache_info  # type: ignore[attr-defined]
        return call
    return wrap


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


def _local_path(ref: str, base_dir: Path | None, what: str = "image") -> str:
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    path = Path(ref).expanduser()
    if not path.is_absolute():
        candidates = ([base_dir / path] if base_dir is not None else []) + [Path.cwd() / path]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        where = f" (looked in {base_dir} and the working directory)" if base_dir is not None else ""
        raise MediaError(f"no such {what} file {ref!r}{where}")
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
    """A video as a list of frame references (each normalised as an image, all of one size), or a video file as
    ``[absolute path or data: URL]`` after checking that PyAV decodes its first frame."""
    if isinstance(value, dict) and value.get("path") and not value.get("bytes"):  # a Hugging Face Video value
        value = value["path"]
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str) \
            and is_video_file(value[0].strip()):  # the normalised form of a file maps to itself
        value = value[0]
    if isinstance(value, str):
        return [_normalize_video_file(value.strip(), base_dir)]
    if not isinstance(value, (list, tuple)) or not value:
        raise MediaError(f"expected a video as a non-empty list of frame images or a video file path, got "
                         f"{type(value).__name__}")
    frames = [normalize_image(v, base_dir) for v in value]
    sizes = {image_size(f) for f in frames}
    if len(sizes) > 1:
        raise MediaError(f"a video's frames differ in size ((height, width): {sorted(sizes)}); give frames of one size")
    return frames


def is_video_file(ref: str) -> bool:
    """A normalised reference to a video file (not a frame image)."""
    return ref[:11].lower().startswith("data:video/") or ref.lower().endswith(VIDEO_SUFFIXES)


def _normalize_video_file(ref: str, base_dir: Path | None) -> str:
    low = ref[:8].lower()
    if low.startswith(("http://", "https://")):
        raise MediaError(f"remote video URL {ref[:120]!r}: lmforge reads media offline; download it and give the "
                         "local path")
    if low.startswith("data:"):
        if not ref[:11].lower().startswith("data:video/"):
            raise MediaError(f"a video as a data URL must be data:video/<type>;base64,..., got {ref[:30]!r}...")
        _decode_data_url(ref)
    else:
        if not ref.lower().endswith(VIDEO_SUFFIXES):
            raise MediaError(f"{ref[:120]!r} is not a video file ({', '.join(VIDEO_SUFFIXES)}); give a video as a "
                             "file of one of those types or as a list of frame images")
        ref = _local_path(ref, base_dir, "video")
    video_info(ref)
    return ref


def _av():
    try:
        import av
    except ImportError:
        raise MediaError("video files are decoded with PyAV, which is not installed: pip install av (or "
                         "'lmforge[video]'), or give the video as a list of frame images") from None
    return av


def _open_container(ref: str):
    av = _av()
    src = io.BytesIO(_decode_data_url(ref)) if ref.startswith("data:") else ref
    what = "the video data URL" if ref.startswith("data:") else repr(ref)
    try:
        container = av.open(src)
    except Exception as e:  # noqa: BLE001 - av.error.* (invalid data, permission, ...)
        raise MediaError(f"cannot decode video {what}: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"video {what} has no video stream")
    return container, what


@ref_cache(maxsize=1024)
def video_info(ref: str) -> tuple[int, float | None, int, int]:
    """``(frames, frames per second, height, width)`` of a video file, from its container (the frames counted from
    its packets when the header does not say); its first frame is decoded to check that the file decodes."""
    container, what = _open_container(ref)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        _check_frame_pixels(stream.codec_context.height or 0, stream.codec_context.width or 0, what)
        first = next(container.decode(stream), None)
        if first is None:
            raise MediaError(f"video {what} has no frames")
        height, width = first.height, first.width
        _check_frame_pixels(height, width, what)
        total = stream.frames
        if not total:
            container.seek(0)
            total = sum(1 for p in container.demux(stream) if p.size)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot decode video {what}: {type(e).__name__}: {e}") from None
    finally:
        container.close()
    return int(total), float(rate) if rate else None, int(height), int(width)


def _check_frame_pixels(height: int, width: int, what: str) -> None:
    """Frames larger than Pillow's decompression-bomb limit (the one every image meets) are refused."""
    limit = _pil().MAX_IMAGE_PIXELS
    if limit and height * width > limit:
        raise MediaError(f"video {what}: frames of {width}x{height} pixels exceed the {limit:,}-pixel limit of "
                         "one image")


def read_video(ref: str, indices: list[int], resize: Any = None) -> list:
    """The RGB frames (PIL images) of a video file at ``indices`` (increasing), decoded in one pass; ``resize``
    (PIL image -> PIL image) is applied to each as it is decoded, so only frames of the size the model takes are
    held (a minute of 4K video at 2 fps would be gigabytes at full size)."""
    want = set(indices)
    frames: dict[int, Any] = {}
    container, what = _open_container(ref)
    try:
        for k, frame in enumerate(container.decode(container.streams.video[0])):
            if k in want:
                image = frame.to_image().convert("RGB")
                frames[k] = resize(image) if resize is not None else image
            if k >= indices[-1]:
                break
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot decode video {what}: {type(e).__name__}: {e}") from None
    finally:
        container.close()
    missing = [k for k in indices if k not in frames]
    if missing:
        raise MediaError(f"video {what}: frame {missing[0]} of the {video_info(ref)[0]} its header counts does not "
                         f"decode (only {len(frames)} of the {len(indices)} wanted did)")
    return [frames[k] for k in indices]


def _source(ref: str):
    return io.BytesIO(_decode_data_url(ref)) if ref.startswith("data:") else ref


@ref_cache(maxsize=4096)
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


def openai_messages(messages: list[dict], images: list[str], videos: list[list[str]] | None = None) -> list[dict]:
    """Messages with ``<image>``/``<video>`` tags as OpenAI content parts, for a server: images as base64 data:
    URLs, a video file as a ``video_url`` part (a data URL), a list of frames as a ``video`` part (data URLs)."""
    img, vid = iter(images), iter(videos or [])
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or (IMAGE_TAG not in content and VIDEO_TAG not in content):
            out.append(m)
            continue
        parts: list[dict] = []
        for piece in re.split(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})", content):
            if piece == IMAGE_TAG:
                parts.append({"type": "image_url", "image_url": {"url": _as_data_url(next(img))}})
            elif piece == VIDEO_TAG:
                video = next(vid)
                if len(video) == 1 and is_video_file(video[0]):
                    parts.append({"type": "video_url", "video_url": {"url": _video_data_url(video[0])}})
                else:
                    parts.append({"type": "video", "video": [_as_data_url(f) for f in video]})
            elif piece:
                parts.append({"type": "text", "text": piece})
        out.append({**m, "content": parts})
    return out


def _as_data_url(ref: str) -> str:
    return ref if ref.startswith("data:") else data_url(open_image(ref))


def _video_data_url(ref: str) -> str:
    if ref.startswith("data:"):
        return ref
    suffix = Path(ref).suffix.lstrip(".").lower() or "mp4"
    return f"data:video/{suffix};base64," + base64.b64encode(Path(ref).read_bytes()).decode("ascii")
