"""The single source of the text a MiniBench model is trained on and evaluated with.

`prompt(task, family, doc)` is the user turn's text (the image goes before it, as both lmms-eval backends place
it); `target(task, family, doc)` is the assistant's answer as trained, in the family's own format. The end-of-turn
token is added by the chat template at training time and stops generation at evaluation time.
"""

from __future__ import annotations

from .tasks import BOX

FAMILIES = ("qwen2_vl", "internvl")
SHORT = "Answer with a single word or number."
SUFFIX = {
    "vqa": SHORT,
    "chart": SHORT,
    "geometry": "Answer with the option's letter.",
    "ocr": "Answer with the text only.",
    "grounding": "Answer with its bounding box.",
    "caption": "",
}


def _check(task: str, family: str) -> None:
    if task not in SUFFIX:
        raise ValueError(f"unknown MiniBench task {task!r}; known: {', '.join(SUFFIX)}")
    if family not in FAMILIES:
        raise ValueError(f"unknown MiniBench family {family!r}; known: {', '.join(FAMILIES)}")


def prompt(task: str, family: str, doc: dict) -> str:
    _check(task, family)
    lines = [doc["question"]]
    lines += [f"{'ABC'[i]}. {choice}" for i, choice in enumerate(doc.get("choices") or [])]
    if SUFFIX[task]:
        lines.append(SUFFIX[task])
    return "\n".join(lines)


def box_text(family: str, bbox) -> str:
    """A box on the 0-1000 grid in the family's format (Qwen2-VL's special box tokens; InternVL's [[...]])."""
    x1, y1, x2, y2 = (round(v) for v in bbox)
    if family == "qwen2_vl":
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    return f"[[{x1}, {y1}, {x2}, {y2}]]"


def target(task: str, family: str, doc: dict) -> str:
    _check(task, family)
    if task == "grounding":
        return box_text(family, doc["bbox"])
    if task == "caption" and doc.get("bbox"):  # a rectangle's caption: its box in the family's format
        return doc["answer"].replace(BOX, box_text(family, doc["bbox"]))
    return doc["answer"]


def chat_messages(task: str, family: str, doc: dict, image=None) -> list[dict]:
    """The user turn as lmms-eval's chat backends take it (internvl_hf's doc_to_messages): image, then text."""
    image = doc["image"] if image is None else image
    return [{"role": "user", "content": [{"type": "image", "url": image},
                                         {"type": "text", "text": prompt(task, family, doc)}]}]  # fmt: skip
