"""``builtin:shapes``: coloured shapes on plain backgrounds, with questions about colour, shape and count.

Every image holds one to three shapes of one kind (circle, square, triangle) and one colour on a
plain background; its question asks for the colour, the kind or the number, answered in one word
(``solution`` holds it). Images are drawn here with PIL from a seeded generator and stored as PNG
``data:`` URLs, so the set is the same everywhere and needs no files. A row belongs to the held-out
``test`` split by a hash of what its image shows, so the splits never share an image.
"""
from __future__ import annotations

import hashlib
import random

from lmforge.dataset.builtin import BuiltinDataset, BuiltinContext
from lmforge.registry import DATASETS

__all__ = ["SHAPES_SIZES", "draw_shapes", "generate_shapes"]

IMAGE_SIZE = 84  # 6 x 6 patches of 14 pixels: 9 tokens after Qwen2-VL's 2 x 2 merge
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 20)}
BACKGROUNDS = ((255, 255, 255), (20, 20, 20), (128, 128, 128))
KINDS = ("circle", "square", "triangle")
QUESTIONS = {
    "colour": ("What colour are the shapes?", "Which colour do you see?"),
    "shape": ("What shape are they?", "Which shape is in the picture?"),
    "count": ("How many shapes are there?", "Count the shapes."),
}
SHAPES_SIZES = {"train": 3000, "test": 300}
TEST_PER_MILLE = 100


def _layout(rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """``n`` non-overlapping boxes ``(x, y, size)`` inside the image."""
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < n:
        size = rng.randint(18, 26)
        x, y = rng.randint(2, IMAGE_SIZE - size - 2), rng.randint(2, IMAGE_SIZE - size - 2)
        if all(x + size + 3 < bx or bx + bs + 3 < x or y + size + 3 < by or by + bs + 3 < y for bx, by, bs in boxes):
            boxes.append((x, y, size))
    return boxes


def draw_shapes(kind: str, colour: str, background: tuple[int, int, int], boxes: list[tuple[int, int, int]]):
    """The PIL image of ``boxes`` filled with ``kind`` in ``colour``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    for x, y, s in boxes:
        if kind == "circle":
            pen.ellipse((x, y, x + s, y + s), fill=fill)
        elif kind == "square":
            pen.rectangle((x, y, x + s, y + s), fill=fill)
        else:
            pen.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return image


def _in_test(key: str) -> bool:
    return int.from_bytes(hashlib.sha256(f"shapes:{key}".encode()).digest()[:4], "big") % 1000 < TEST_PER_MILLE


def generate_shapes(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """``n`` rows of ``split`` (default 3,000 train, 300 test): ``<image>`` + a question, a one-word answer."""
    from lmforge.dataset.media import data_url

    if split not in SHAPES_SIZES:
        raise ValueError(f"shapes split must be 'train' or 'test', got {split!r}")
    n = SHAPES_SIZES[split] if n is None else n
    rng, rows, k = random.Random(f"shapes:{seed}"), [], 0
    while len(rows) < n:
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
        background = rng.choice(BACKGROUNDS)
        boxes = _layout(rng, rng.randint(1, 3))
        topic = tuple(QUESTIONS)[k % len(QUESTIONS)]
        question = rng.choice(QUESTIONS[topic])
        k += 1
        if _in_test(f"{kind}|{colour}|{background}|{boxes}") != (split == "test"):
            continue
        answer = {"colour": colour, "shape": kind, "count": str(len(boxes))}[topic]
        rows.append({"messages": [{"role": "user", "content": f"<image>{question}"},
                                  {"role": "assistant", "content": answer}],
                     "images": [data_url(draw_shapes(kind, colour, background, boxes))],
                     "solution": answer})
    return rows


def _load_shapes(split: str, ctx: BuiltinContext) -> list[dict]:
    return generate_shapes(split)


DATASETS.register(
    "shapes",
    BuiltinDataset(
        "shapes",
        _load_shapes,
        splits=("train", "test"),
        description="coloured circles, squares and triangles on plain backgrounds (84x84 PNG data URLs) with "
                    "one-word questions on colour, shape and count; test is 300 held-out images",
    ),
)
