"""suite=modality: ModelCompose's MUSIC-AVQA and AVQA test files as lmms-eval datasets, and the paper's metrics.

`suite.data_dir` holds the released files (HF dataset `Adu2021/ModelCompose`, folder `test/`):
`<set>_mm_video+image+audio.json` (ModelCompose conversations: id, conversations[0].value = the user turn with
its placeholders, modal_inputs = {vision: [...], audio: [...], video: [...]} relative to data_dir) and
`<set>_mm_answer.json` (the gold answers by id), for <set> = music-avqa-test and avqa-test, plus the media.
At run time each set is joined into a DatasetDict (columns id, question, answer, vision, audio, video with
absolute paths) in a temporary directory that the packaged task YAMLs read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from .. import MergeError

DATA_PLACEHOLDER = "@MODALITY_DATA@"
SETS = ("music-avqa-test", "avqa-test")
QUESTIONS = "{}_mm_video+image+audio.json"
ANSWERS = "{}_mm_answer.json"


def music_avqa_score(prediction: str, answer: str) -> float:
    """MUSIC-AVQA: exact match after the EvalAI (VQA) answer normalisation of both sides."""
    from ..evaluation.metrics import _eval_ai_processor

    process = _eval_ai_processor()
    return float(process(prediction or "") == process(answer or ""))


def avqa_score(prediction: str, answer: str) -> float:
    """AVQA: the answer's first character against the gold option letter, as the paper's script (no normalisation)."""
    return float((prediction or "").strip()[:1] == (answer or "").strip())


def _answers(file: Path) -> dict[str, str]:
    data = json.loads(file.read_text())
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise MergeError(f"{file}: item {i} is not an object with an id and an answer")
        key = item.get("id", item.get("question_id"))
        answer = next((item[k] for k in ("answer", "gt", "label", "text") if k in item), None)
        if key is None or answer is None:
            raise MergeError(f"{file}: item {i} has no id/question_id or no answer/gt/label/text")
        out[str(key)] = str(answer)
    return out


def load_set(data_dir: Path, name: str) -> list[dict]:
    """One test set joined with its answers: dicts of id, question, answer, vision, audio, video."""
    qfile, afile = data_dir / QUESTIONS.format(name), data_dir / ANSWERS.format(name)
    for f in (qfile, afile):
        if not f.is_file():
            raise MergeError(f"suite.data_dir: {f} missing (the ModelCompose test files, see docs/modality.md)")
    answers = _answers(afile)
    rows = []
    for i, item in enumerate(json.loads(qfile.read_text())):
        key = str(item.get("id", i))
        if key not in answers:
            raise MergeError(f"{afile}: no answer for question {key}")
        turns = item.get("conversations") or []
        human = next((t.get("value") for t in turns if t.get("from") == "human"), None)
        if not human:
            raise MergeError(f"{qfile}: question {key} has no human turn")
        inputs = item.get("modal_inputs") or {}
        row = {"id": key, "question": human, "answer": answers[key]}
        for modality in ("vision", "audio", "video"):
            files = inputs.get(modality) or []
            files = [files] if isinstance(files, str) else files
            row[modality] = [str((data_dir / f).resolve()) if not Path(f).is_absolute() else f for f in files]
        rows.append(row)
    return rows


def render_modality_tasks(suite_cfg, stack: ExitStack) -> Path:
    """The packaged modality task YAMLs with the joined datasets filled in, in a temporary directory."""
    from datasets import Dataset, DatasetDict

    from ..evaluation import TASKS_DIR

    if not suite_cfg.get("data_dir"):
        raise MergeError(f"suite={suite_cfg.name}: suite.data_dir is not set (the folder of ModelCompose's test files)")
    data_dir = Path(suite_cfg.data_dir).expanduser()
    if not data_dir.is_dir():
        raise MergeError(f"suite.data_dir: {data_dir} is not a directory")
    out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbench-modality-tasks-")))
    wanted = {t.name for t in suite_cfg.tasks}
    for name in SETS:
        task = "modality_" + name.removesuffix("-test").replace("-", "_")
        if task not in wanted:
            continue
        DatasetDict({"test": Dataset.from_list(load_set(data_dir, name))}).save_to_disk(str(out / "data" / name))
    tasks = out / "tasks"
    tasks.mkdir()
    for path in (TASKS_DIR / "modality").iterdir():
        if path.suffix == ".yaml" or path.name.endswith("_yaml"):
            (tasks / path.name).write_text(path.read_text().replace(DATA_PLACEHOLDER, str(out / "data")))
        elif path.is_file():
            shutil.copy2(path, tasks / path.name)
    return tasks
