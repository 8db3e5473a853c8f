"""Hooks for the paper suite's lmms-eval tasks (referenced as `!function utils.<name>` from the YAMLs).

Prompts follow each family's training format; the family comes in through `lmms_eval_specific_kwargs`, which
lmms-eval selects by the backend name we give the TaskManager (qwen2_vl, internvl_hf, internvl2, llava_hf).
Scores come from mmbench_merge.evaluation.metrics (which calls lmms-eval's metric code where it has one).
"""

from __future__ import annotations

import os
from pathlib import Path

from mmbench_merge.evaluation import metrics

SHORT_ANSWER = {
    # Qwen2-VL experts were trained (LLaMA-Factory) on questions with this suffix.
    "qwen": "\nPlease try to answer the question with short words or phrases if possible.",
    # InternVL's own VQA evaluation prompt.
    "internvl": "\nAnswer the question using a single word or phrase.",
    "plain": "\nAnswer the question using a single word or phrase.",
}
UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
GROUNDING = {
    "qwen": "Please provide the bounding box coordinate of the region this sentence describes: {ref}",
    "internvl": "Please provide the bounding box coordinate of the region this sentence describes: <ref>{ref}</ref>",
    # lmms-eval's RefCOCO prompt for models that answer with 0-1 floats
    "plain": (
        "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
        "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
        "bounding box coordinate of the region this sentence describes: {ref}"
    ),
}


def _style(kwargs) -> str:
    return (kwargs or {}).get("style", "plain")


def image_visual(doc):
    return [doc["image"].convert("RGB")]


def decoded_image_visual(doc):
    return [doc["decoded_image"].convert("RGB")]


# ------------------------------------------------------------------------------------------ VQA / OCR / chart
def short_answer_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}{SHORT_ANSWER[_style(lmms_eval_specific_kwargs)]}"


def vizwiz_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']}{UNANSWERABLE}{SHORT_ANSWER[_style(lmms_eval_specific_kwargs)]}"


def vqa_acc_results(doc, results):
    return {"vqa_acc": metrics.vqa_accuracy(results[0], list(doc["answers"] or []))}


def exact_match_results(doc, results):
    return {"exact_match": metrics.exact_match(results[0], doc["answer"])}


def relaxed_acc_results(doc, results):
    return {"relaxed_acc": metrics.relaxed_accuracy(results[0], doc["answer"])}


GQA_IMAGES = ("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev")  # hub id, config, split
GQA_IMAGES_ENV = "MMBENCH_GQA_IMAGES"  # a local copy instead (a `save_to_disk` directory)


def gqa_images():
    """GQA's testdev-balanced images: stored apart from the questions. A public dataset: no token is asked for
    (lmms-eval's own hook passes token=True, which fails without a hub login)."""
    import datasets

    local = os.environ.get(GQA_IMAGES_ENV)
    if local:
        images = datasets.load_from_disk(local)
        return images[GQA_IMAGES[2]] if isinstance(images, datasets.DatasetDict) else images
    path, name, split = GQA_IMAGES
    return datasets.load_dataset(path, name, split=split)


def gqa_process_docs(dataset):
    """Each question row gets the image its `imageId` names."""
    images = gqa_images()
    row_of = {image_id: i for i, image_id in enumerate(images["id"])}
    missing = sorted(set(dataset["imageId"]) - set(row_of))
    if missing:
        raise ValueError(f"GQA: image {missing[0]} of the questions is not in the images split ({len(missing)} missing)")

    def attach(doc):
        return {"image": images[row_of[doc["imageId"]]]["image"].convert("RGB")}

    return dataset.map(attach)


def ocrvqa_process_docs(dataset):
    """One row per (image, question, answer): howard-hou/OCR-VQA stores the questions of a cover together."""

    def explode(batch):
        out = {"image": [], "question": [], "answer": [], "image_id": []}
        for image, image_id, questions, answers in zip(batch["image"], batch["image_id"], batch["questions"],
                                                       batch["answers"]):  # fmt: skip
            for question, answer in zip(questions, answers):
                out["image"].append(image)
                out["image_id"].append(image_id)
                out["question"].append(question)
                out["answer"].append(answer)
        return out

    return dataset.map(explode, batched=True, remove_columns=dataset.column_names)


TESTCORE_ENV = "MMBENCH_OCRVQA_TESTCORE"


def ocrvqa_testcore_keys() -> tuple[Path, set[str], set[tuple[str, str]]]:
    """The OCRVQA_TESTCORE key list named by $MMBENCH_OCRVQA_TESTCORE: (path, whole image ids, (image id,
    question) pairs). One key a line: `image_id` (every question of that cover) or `image_id<TAB>question`;
    blank lines and lines starting with # are skipped. A missing or empty list is one MergeError line."""
    from mmbench_merge import MergeError

    value = os.environ.get(TESTCORE_ENV)
    if not value:
        raise MergeError(
            f"task mmb_ocrvqa_testcore (the paper's OCRVQA_TESTCORE subset) needs its question list, which is not "
            f"shipped: set {TESTCORE_ENV}=<file> (one `image_id` or `image_id<TAB>question` per line, "
            "docs/evaluation.md), or run suite=paper_ocrvqa_full for the whole OCR-VQA test split"
        )  # fmt: skip
    path = Path(value).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"{TESTCORE_ENV}={value}: cannot read the OCRVQA_TESTCORE key list ({exc})") from None
    images, pairs = set(), set()
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        image_id, tab, question = line.partition("\t")
        if tab:
            pairs.add((image_id.strip(), " ".join(question.split())))
        else:
            images.add(image_id.strip())
    if not images and not pairs:
        raise MergeError(f"{TESTCORE_ENV}={value}: the OCRVQA_TESTCORE key list has no keys")
    return path, images, pairs


def ocrvqa_testcore_process_docs(dataset):
    """The test split's questions listed in $MMBENCH_OCRVQA_TESTCORE, one row per question (as the full task)."""
    from mmbench_merge import MergeError

    path, images, pairs = ocrvqa_testcore_keys()
    wanted = images | {image_id for image_id, _ in pairs}
    covers = dataset.filter(lambda image_id: image_id in wanted, input_columns=["image_id"])
    rows = ocrvqa_process_docs(covers)
    rows = rows.filter(
        lambda image_id, question: image_id in images or (image_id, " ".join(question.split())) in pairs,
        input_columns=["image_id", "question"],
    )  # fmt: skip
    if len(rows) == 0:
        raise MergeError(f"{TESTCORE_ENV}={path}: none of its keys matches a question of the OCR-VQA test split")
    return rows


# ------------------------------------------------------------------------------------------ geometry
def _judge_model() -> str | None:
    """An LLM judge only when configured (evaluator.judge sets MMBENCH_JUDGE_MODEL); rule-based otherwise."""
    from mmbench_merge.evaluation import judge

    return judge.configured()


def mathvista_process_docs(dataset):
    return dataset.filter(lambda doc: bool(metrics.mathvista_categories(doc)))


def mathvista_text(doc, lmms_eval_specific_kwargs=None):
    return doc["query"]  # the benchmark's own prompt: hint + question + choices


def mathvista_results(doc, results):
    """`geo_acc`: rule-based extraction (the default, always reported); `geo_acc_judge` as well when
    evaluator.judge is set: the judge extracts the answer, MathVista's rule compares it."""
    response = results[0]
    categories = metrics.mathvista_categories(doc)
    out = {"geo_acc": {"score": metrics.mathvista_score(response, doc), "categories": categories}}
    if _judge_model():
        from mmbench_merge.evaluation import judge

        extracted = judge.extract(doc["query"], response)
        score = metrics.mathvista_score(extracted, doc) if extracted is not None else 0.0
        out["geo_acc_judge"] = {"score": score, "categories": categories}
    return out


def mathvision_process_docs(dataset):
    return dataset.filter(lambda doc: bool(metrics.mathvision_categories(doc)))


def mathvision_text(doc, lmms_eval_specific_kwargs=None):
    options = doc["options"] or []
    if options:
        listed = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
        return f"{doc['question']}\nChoices:\n{listed}\nAnswer with the option's letter from the given choices directly."
    return f"{doc['question']}\nAnswer the question with a single number or expression."


def mathvision_results(doc, results):
    """As MathVista: the rule-based checker (`geo_acc`), and with a judge `geo_acc_judge` (the judge extracts the
    answer, lmms-eval's MathVision checker compares it)."""
    categories = metrics.mathvision_categories(doc)
    out = {"geo_acc": {"score": metrics.mathvision_score(results[0], doc), "categories": categories}}
    if _judge_model():
        from mmbench_merge.evaluation import judge

        extracted = judge.extract(mathvision_text(doc), results[0])
        score = metrics.mathvision_score(extracted, doc) if extracted is not None else 0.0
        out["geo_acc_judge"] = {"score": score, "categories": categories}
    return out


def geometry_mean(items):
    return metrics.category_mean(items)


# ------------------------------------------------------------------------------------------ grounding
def refcoco_process_docs(dataset):
    # lmms-eval's own: boxes to [x1, y1, x2, y2] in 0-1 image coordinates, one row per referring expression
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_preprocess_dataset

    return refcoco_bbox_rec_preprocess_dataset(dataset)


def refcoco_text(doc, lmms_eval_specific_kwargs=None):
    return GROUNDING[_style(lmms_eval_specific_kwargs)].format(ref=doc["answer"])


def refcoco_results(doc, results):
    return {"acc_iou50": metrics.grounding_accuracy(results[0], doc["bbox"])}
