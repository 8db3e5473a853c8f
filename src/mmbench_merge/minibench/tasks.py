"""Synthetic tasks of the five capabilities, drawn with PIL, deterministic by seed.

Every sample is a dict with the dataset columns of the MiniBench contract: ``id``, ``image`` (a 112 x 112 RGB
PIL image), ``question`` (family-neutral), ``answer`` (the gold short answer; for grounding the box as
``[x1, y1, x2, y2]`` on the 0-1000 grid), ``bbox`` (4 floats on the 0-1000 grid, or empty), ``choices``
(multiple-choice options, or empty) and ``task``. ``caption`` draws the same image world with a generic
description instead of a question: the base model is trained on those, the experts on the tasks.

The tasks are sized to what a ~1M-parameter model learns in a few minutes: large glyphs, few characters, objects
on a coarse 4 x 4 grid of cells (so a box is one of 16 positions, written with exact 0-1000 numbers).
"""

from __future__ import annotations

import random
from functools import lru_cache

SIZE = 112  # image side in pixels: 8 x 8 patches of 14 px, 16 visual tokens after the 2 x 2 merge
CELL = SIZE // 4  # objects sit in a 4 x 4 grid of cells
TASKS = ("vqa", "geometry", "chart", "ocr", "grounding")

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COLUMN_WORDS = ("left", "center left", "center right", "right")
ROW_WORDS = ("top", "upper middle", "lower middle", "bottom")
GLYPHS = "0123456789ABCDEFHKLMNPRTXY"  # digits and letters that stay distinct at this size
BAR_LABELS = "ABCD"
BACKGROUND = (255, 255, 255)


@lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # the font bundled with Pillow: the same glyphs on every machine


def _canvas():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _to_grid(v: float) -> int:
    """A pixel coordinate on the 0-1000 grid that both families' box formats use."""
    return round(v * 1000 / SIZE)


# ------------------------------------------------------------------------------------------ objects
def _place_objects(rng: random.Random, n: int, distinct: str = "color"):
    """`n` objects in distinct cells; colours (or shapes) distinct so that a description names one object."""
    cells = rng.sample(range(16), n)
    colors = rng.sample(list(COLORS), n) if distinct in ("color", "both") else [rng.choice(list(COLORS))] * n
    shapes = rng.sample(SHAPES, n) if distinct in ("shape", "both") else [rng.choice(SHAPES) for _ in range(n)]
    objects = []
    for cell, color, shape in zip(cells, colors, shapes):
        row, col = divmod(cell, 4)
        side = rng.randint(18, 24)
        x0 = col * CELL + (CELL - side) // 2 + rng.randint(-1, 1)
        y0 = row * CELL + (CELL - side) // 2 + rng.randint(-1, 1)
        objects.append({"color": color, "shape": shape, "row": row, "col": col,
                        "box": (x0, y0, x0 + side, y0 + side)})  # fmt: skip
    return objects


def _draw_objects(draw, objects) -> None:
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _where(obj) -> str:
    return f"{ROW_WORDS[obj['row']]} {COLUMN_WORDS[obj['col']]}"


def _objects_scene(rng):
    objects = _place_objects(rng, rng.randint(1, 3), distinct="color")
    image, draw = _canvas()
    _draw_objects(draw, objects)
    return image, objects


def _describe_objects(objects) -> str:
    return ", ".join(f"{o['color']} {o['shape']} {_where(o)}" for o in objects) + "."


# ------------------------------------------------------------------------------------------ tasks
def vqa(rng: random.Random) -> dict:
    image, objects = _objects_scene(rng)
    kind = rng.choice(["color", "shape", "count", "position"] if len(objects) > 1 else ["color", "shape", "count"])
    target = rng.choice(objects)
    if kind == "color":
        question, answer = f"What color is the {target['shape']}?", target["color"]
        if sum(o["shape"] == target["shape"] for o in objects) > 1:  # ambiguous: ask by position instead
            question = f"What color is the object at the {_where(target)}?"
    elif kind == "shape":
        question, answer = f"What shape is the {target['color']} object?", target["shape"]
    elif kind == "count":
        question, answer = "How many objects are there?", str(len(objects))
    else:
        a, b = rng.sample(objects, 2)
        if a["col"] != b["col"]:
            question = f"Is the {a['color']} object left or right of the {b['color']} object?"
            answer = "left" if a["col"] < b["col"] else "right"
        else:
            question = f"Is the {a['color']} object above or below the {b['color']} object?"
            answer = "above" if a["row"] < b["row"] else "below"
    return {"image": image, "question": question, "answer": answer, "bbox": [], "choices": []}


def _triangle(rng: random.Random):
    """A triangle whose longest side is clearly the longest (>= 20% longer than the others)."""
    while True:
        pts = [(rng.randint(10, SIZE - 10), rng.randint(10, SIZE - 10)) for _ in range(3)]
        sides = []
        for i in range(3):
            (xa, ya), (xb, yb) = pts[i], pts[(i + 1) % 3]
            sides.append(((xa - xb) ** 2 + (ya - yb) ** 2) ** 0.5)
        ordered = sorted(sides)
        if ordered[0] > 25 and ordered[2] > 1.2 * ordered[1]:
            return pts, sides


SIDE_COLORS = ("red", "green", "blue")


def _draw_triangle(rng):
    pts, sides = _triangle(rng)
    image, draw = _canvas()
    for i, color in enumerate(SIDE_COLORS):
        draw.line([pts[i], pts[(i + 1) % 3]], fill=COLORS[color], width=4)
    return image, sides


def _rectangle(rng):
    while True:
        w, h = rng.randint(20, 100), rng.randint(20, 100)
        if max(w, h) > 1.3 * min(w, h):
            break
    x0, y0 = rng.randint(4, SIZE - 4 - w), rng.randint(4, SIZE - 4 - h)
    image, draw = _canvas()
    draw.rectangle((x0, y0, x0 + w, y0 + h), outline=(0, 0, 0), width=3)
    return image, w, h


def geometry(rng: random.Random) -> dict:
    if rng.random() < 0.6:
        image, sides = _draw_triangle(rng)
        correct = SIDE_COLORS[max(range(3), key=sides.__getitem__)]
        options = rng.sample(SIDE_COLORS, 3)
        question = "Which side of the triangle is the longest?"
        choices = [f"the {c} side" for c in options]
    else:
        image, w, h = _rectangle(rng)
        correct = "width" if w > h else "height"
        options = rng.sample(["width", "height"], 2)
        question = "Which is larger in the rectangle, its width or its height?"
        choices = [f"the {c}" for c in options]
    answer = "ABC"[options.index(correct)]
    return {"image": image, "question": question, "answer": answer, "bbox": [], "choices": choices}


def _bars(rng):
    n = rng.randint(3, 4)
    values = [rng.randint(1, 9) for _ in range(n)]
    while values.count(max(values)) > 1:  # a unique largest bar
        values = [rng.randint(1, 9) for _ in range(n)]
    return values


def _draw_chart(values, line: bool):
    image, draw = _canvas()
    top, bottom, left = 8, 92, 10
    unit = (bottom - top) / 9
    for v in range(0, 10, 3):  # gridlines at 0, 3, 6, 9
        y = bottom - v * unit
        draw.line([(left, y), (SIZE - 4, y)], fill=(200, 200, 200), width=1)
    slot = (SIZE - 4 - left) / len(values)
    font = _font(16)
    points = []
    for i, v in enumerate(values):
        cx = left + slot * (i + 0.5)
        y = bottom - v * unit
        if line:
            points.append((cx, y))
        else:
            draw.rectangle((cx - slot * 0.3, y, cx + slot * 0.3, bottom), fill=COLORS["blue"])
        draw.text((cx, bottom + 2), BAR_LABELS[i], fill=(0, 0, 0), font=font, anchor="mt")
    if line:
        draw.line(points, fill=COLORS["red"], width=3)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLORS["red"])
    return image


def chart(rng: random.Random) -> dict:
    values = _bars(rng)
    line = rng.random() < 0.3
    image = _draw_chart(values, line)
    kind = "point" if line else "bar"
    if rng.random() < 0.5:
        i = rng.randrange(len(values))
        question, answer = f"What is the value of {kind} {BAR_LABELS[i]}?", str(values[i])
    else:
        question = f"Which {kind} has the largest value?"
        answer = BAR_LABELS[values.index(max(values))]
    return {"image": image, "question": question, "answer": answer, "bbox": [], "choices": []}


def _draw_text(rng):
    text = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(2, 3)))
    image, draw = _canvas()
    font = _font(34)
    x = rng.randint(8, SIZE - 8 - 24 * len(text))
    y = rng.choice([6, 38, 70])
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return image, text


def ocr(rng: random.Random) -> dict:
    image, text = _draw_text(rng)
    return {"image": image, "question": "What text is written in the image?", "answer": text, "bbox": [],
            "choices": []}  # fmt: skip


def grounding(rng: random.Random) -> dict:
    objects = _place_objects(rng, rng.randint(2, 3), distinct="both")
    image, draw = _canvas()
    _draw_objects(draw, objects)
    target = rng.choice(objects)
    box = [float(_to_grid(v)) for v in target["box"]]
    return {"image": image, "question": f"Locate the {target['color']} {target['shape']}.",
            "answer": "[" + ", ".join(str(int(v)) for v in box) + "]", "bbox": box, "choices": []}  # fmt: skip


GENERATORS = {"vqa": vqa, "geometry": geometry, "chart": chart, "ocr": ocr, "grounding": grounding}


# ------------------------------------------------------------------------------------------ captions (base)
def caption(rng: random.Random) -> dict:
    """A generic description of one image of the same world: what the base model is trained on."""
    kind = rng.choice(["objects", "objects", "triangle", "rectangle", "chart", "text"])
    if kind == "objects":
        objects = _place_objects(rng, rng.randint(1, 3), distinct=rng.choice(["color", "shape", "both"]))
        image, draw = _canvas()
        _draw_objects(draw, objects)
        text = f"{len(objects)}: {_describe_objects(objects)}"
    elif kind == "triangle":
        image, sides = _draw_triangle(rng)
        order = sorted(range(3), key=sides.__getitem__, reverse=True)
        text = f"triangle, sides from long to short: {', '.join(SIDE_COLORS[i] for i in order)}."
    elif kind == "rectangle":
        image, w, h = _rectangle(rng)
        text = f"rectangle, {'wide' if w > h else 'tall'}."
    elif kind == "chart":
        values = _bars(rng)
        line = rng.random() < 0.3
        image = _draw_chart(values, line)
        text = f"{'line' if line else 'bar'} chart: " + ", ".join(f"{BAR_LABELS[i]} {v}" for i, v in
                                                                     enumerate(values)) + "."  # fmt: skip
    else:
        image, text_in_image = _draw_text(rng)
        text = f"text: {text_in_image}."
    return {"image": image, "question": "Describe the image.", "answer": text, "bbox": [], "choices": []}


def generate(task: str, n: int, seed: int, split: str) -> list[dict]:
    """`n` samples of `task` (or "caption"); the same (task, n, seed, split) gives the same samples."""
    fn = caption if task == "caption" else GENERATORS[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    samples = []
    for i in range(n):
        sample = fn(rng)
        sample.update(id=f"{task}-{split}-{i:05d}", task=task)
        samples.append(sample)
    return samples
