"""Synthetic tasks of the five capabilities, drawn with PIL, deterministic by seed.

Every sample is a dict with the dataset columns of the MiniBench contract: ``id``, ``image`` (a 112 x 112 RGB
PIL image), ``question`` (family-neutral), ``answer`` (the gold short answer; for grounding the box as
``[x1, y1, x2, y2]`` on the 0-1000 grid), ``bbox`` (4 floats on the 0-1000 grid, or empty), ``choices``
(multiple-choice options, or empty) and ``task``. ``caption`` draws the same image world with a generic
description instead of a question: the base model is trained on those, the experts on the tasks.

The tasks are sized to what a ~2M-parameter model learns in minutes: large glyphs in fixed slots, objects on a
coarse 4 x 4 grid of cells (a box is one of 16 positions, written with exact 0-1000 numbers), bars in the columns
of that grid, multiple-choice options in a fixed order.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

SIZE = 112  # image side in pixels: 8 x 8 patches of 14 px, 16 visual tokens after the 2 x 2 merge
CELL = SIZE // 4  # objects sit in a 4 x 4 grid of cells, one visual token each
OBJECT = 20  # object side in pixels
MARGIN = (CELL - OBJECT) // 2
TASKS = ("vqa", "geometry", "chart", "ocr", "grounding")

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COLUMN_WORDS = ("left", "center left", "center right", "right")
ROW_WORDS = ("top", "upper middle", "lower middle", "bottom")
GLYPHS = "0123456789AEHKLPRTXY"  # digits and letters that stay distinct at this size
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
    """`n` objects in distinct cells; colours (or shapes) distinct so that a description names one object.

    Every object fills the same box inside its cell, so a box is one of 16 exact positions: what a ~2M-parameter
    model can learn to write on the 0-1000 grid (the first trial's fine-grained boxes collapsed to one average box).
    """
    cells = rng.sample(range(16), n)
    colors = rng.sample(list(COLORS), n) if distinct in ("color", "both") else [rng.choice(list(COLORS))] * n
    shapes = rng.sample(SHAPES, n) if distinct in ("shape", "both") else [rng.choice(SHAPES) for _ in range(n)]
    objects = []
    for cell, color, shape in zip(cells, colors, shapes):
        row, col = divmod(cell, 4)
        x0, y0 = col * CELL + MARGIN, row * CELL + MARGIN
        objects.append({"color": color, "shape": shape, "row": row, "col": col,
                        "box": (x0, y0, x0 + OBJECT, y0 + OBJECT)})  # fmt: skip
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
        else:  # answered with a colour: words the base has written (it never wrote "above" or "below")
            question = f"Which object is higher, the {a['color']} one or the {b['color']} one?"
            answer = a["color"] if a["row"] < b["row"] else b["color"]
    return {"image": image, "question": question, "answer": answer, "bbox": [], "choices": []}


LINE_COLORS = ("red", "green", "blue")
POLYGON_SIDES = (3, 4, 5)


def _draw_lines(rng):
    """Three horizontal segments, one per colour, lengths at least 16 px apart: which side is the longest."""
    lengths = rng.sample(range(24, 105, 16), 3)
    image, draw = _canvas()
    for i, (color, length) in enumerate(zip(LINE_COLORS, lengths)):
        y = 22 + 34 * i
        x0 = rng.randint(4, SIZE - 4 - length)
        draw.line([(x0, y), (x0 + length, y)], fill=COLORS[color], width=6)
    return image, lengths


def _rectangle(rng):
    while True:
        w, h = rng.randint(20, 100), rng.randint(20, 100)
        if max(w, h) > 1.5 * min(w, h):
            break
    x0, y0 = rng.randint(4, SIZE - 4 - w), rng.randint(4, SIZE - 4 - h)
    image, draw = _canvas()
    draw.rectangle((x0, y0, x0 + w, y0 + h), outline=(0, 0, 0), width=3)
    return image, w, h, (x0, y0, x0 + w, y0 + h)


def _polygon(rng):
    """A regular polygon of 3, 4 or 5 sides, filled, at a random rotation: how many sides."""
    sides = rng.choice(POLYGON_SIDES)
    radius, turn = rng.randint(36, 48), rng.random() * 2 * math.pi
    cx, cy = rng.randint(radius + 4, SIZE - radius - 4), rng.randint(radius + 4, SIZE - radius - 4)
    points = [(cx + radius * math.cos(turn + 2 * math.pi * k / sides), cy + radius * math.sin(turn + 2 * math.pi * k
              / sides)) for k in range(sides)]  # fmt: skip
    image, draw = _canvas()
    draw.polygon(points, fill=(90, 90, 90))
    return image, sides


def geometry(rng: random.Random) -> dict:
    """Multiple choice; the options come in a fixed order (a tiny model reads the figure, not a shuffled list)."""
    kind = rng.choice(["lines", "rectangle", "polygon"])
    if kind == "lines":
        image, lengths = _draw_lines(rng)
        question = "Which side is the longest?"
        choices, answer = [f"the {c} side" for c in LINE_COLORS], max(range(3), key=lengths.__getitem__)
    elif kind == "rectangle":
        image, w, h, _ = _rectangle(rng)
        question = "Which is larger in the rectangle, its width or its height?"
        choices, answer = ["the width", "the height"], 0 if w > h else 1
    else:
        image, sides = _polygon(rng)
        question = "How many sides does the polygon have?"
        choices, answer = [str(n) for n in POLYGON_SIDES], POLYGON_SIDES.index(sides)
    return {"image": image, "question": question, "answer": "ABC"[answer], "bbox": [], "choices": choices}


CHART_MAX = 6  # values 1-6, 14 px apart: each level is visibly different at 112 px


def _bars(rng):
    n = rng.randint(3, 4)
    values = [rng.randint(1, CHART_MAX) for _ in range(n)]
    while values.count(max(values)) > 1:  # a unique largest bar
        values = [rng.randint(1, CHART_MAX) for _ in range(n)]
    return values


def _draw_chart(values, line: bool):
    """Bars (or points) in the columns of the 4 x 4 token grid, labelled A-D below, a gridline per unit."""
    image, draw = _canvas()
    bottom, unit = 96, 14
    for v in range(CHART_MAX + 1):
        y = bottom - v * unit
        draw.line([(0, y), (SIZE, y)], fill=(210, 210, 210), width=1)
    font = _font(14)
    points = []
    for i, v in enumerate(values):
        cx, y = CELL * (i + 0.5), bottom - v * unit
        if line:
            points.append((cx, y))
        else:
            draw.rectangle((cx - 9, y, cx + 9, bottom), fill=COLORS["blue"])
        draw.text((cx, bottom + 1), BAR_LABELS[i], fill=(0, 0, 0), font=font, anchor="mt")
    if line:
        draw.line(points, fill=COLORS["red"], width=3)
        for x, y in points:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=COLORS["red"])
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
    """2-3 large glyphs, one per 36 px slot on one line: reading is three glyph classifications."""
    text = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(2, 3)))
    image, draw = _canvas()
    font = _font(40)
    y = 56 + rng.randint(-2, 2)
    for i, glyph in enumerate(text):
        draw.text((20 + 36 * i + rng.randint(-2, 2), y), glyph, fill=(0, 0, 0), font=font, anchor="mm")
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
# The rectangle's caption gives its box in the family's own format (prompts.target fills it in): the base learns
# to write boxes on the 0-1000 grid, as a real base model has, while the grounding task (which box belongs to a
# named object) is left to the expert.
BOX = "<box>"
CAPTION_KINDS = ("objects", "objects", "lines", "rectangle", "polygon", "chart", "chart", "text", "text")


def caption(rng: random.Random) -> dict:
    """A generic description of one image of the same world: what the base model is trained on."""
    kind = rng.choice(CAPTION_KINDS)
    if kind == "objects":
        objects = _place_objects(rng, rng.randint(1, 3), distinct=rng.choice(["color", "shape", "both"]))
        image, draw = _canvas()
        _draw_objects(draw, objects)
        text = f"{len(objects)}: {_describe_objects(objects)}"
    elif kind == "lines":
        image, lengths = _draw_lines(rng)
        order = sorted(range(3), key=lengths.__getitem__, reverse=True)
        text = f"lines from long to short: {', '.join(LINE_COLORS[i] for i in order)}."
    elif kind == "rectangle":
        image, w, h, box = _rectangle(rng)
        text = f"rectangle, {'wide' if w > h else 'tall'}, {BOX}"  # no full stop: it ends as a grounding answer
    elif kind == "polygon":
        image, sides = _polygon(rng)
        text = f"polygon, {sides} sides."
    elif kind == "chart":
        values = _bars(rng)
        line = rng.random() < 0.3
        image = _draw_chart(values, line)
        text = f"{'line' if line else 'bar'} chart: " + ", ".join(f"{BAR_LABELS[i]} {v}" for i, v in
                                                                     enumerate(values)) + "."  # fmt: skip
    else:
        image, text_in_image = _draw_text(rng)
        text = f"text: {text_in_image}."
    bbox = [float(_to_grid(v)) for v in box] if kind == "rectangle" else []
    return {"image": image, "question": "Describe the image.", "answer": text, "bbox": bbox, "choices": []}


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
