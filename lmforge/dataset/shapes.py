"""``builtin:shapes``: coloured shapes on a plain background, with questions about colour, shape and count.

Every image holds one to three shapes of one kind (circle, square, triangle) and one colour on a
plain white background, each shape in its own cell of a 3 x 3 grid; its question asks for the
colour, the kind or the number, answered in one word (``solution`` holds it). Images are drawn here with PIL from a seeded generator and stored as PNG
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
CELL = 28  # one merged token's square
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 20)}
BACKGROUNDS = ((255, 255, 255),)
KINDS = ("circle", "square", "triangle")
QUESTIONS = {
    "colour": ("What colour are the shapes?", "Which colour do you see?"),
    "shape": ("What shape are they?", "Which shape is in the picture?"),
    "count": ("How many shapes are there?", "Count the shapes."),
}
SHAPES_SIZES = {"train": 8000, "test": 300}
TEST_PER_MILLE = 100


def _layout(rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """``n`` boxes ``(x, y, size)``, each inside its own cell of a 3 x 3 grid of 28-pixel cells.

    A cell is what one image token of Qwen2-VL sees (2 x 2 patches of 14 pixels), so a small model can
    tell shapes apart from one token and count the tokens that hold one; sizes and places within the
    cells vary.
    """
    cells = rng.sample(range(9), n)
    boxes = []
    for c in sorted(cells):
        size = rng.randint(16, 24)
        x = (c % 3) * CELL + rng.randint(1, CELL - size - 1)
        y = (c // 3) * CELL + rng.randint(1, CELL - size - 1)
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
    """``n`` rows of ``split`` (default 8,000 train, 300 test): ``<image>`` + a question, a one-word answer."""
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
        description="1-3 coloured circles, squares or triangles on white (84x84 PNG data URLs) with one-word "
                    "questions on colour, shape and count; 8,000 train rows, test is 300 held-out images",
    ),
)
