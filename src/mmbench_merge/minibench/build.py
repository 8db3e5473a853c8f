"""Build the MiniBench: datasets, tokenizer, and both model families (base + five experts each).

Layout of a built root:

    build.json                       the build config and its hash (written last: its presence means complete)
    data/<task>/{train,test}/        datasets.Dataset.save_to_disk
    tokenizer/                       the tokenizer trained on the synthetic corpus
    qwen2_vl/base/                   Qwen2VLForConditionalGeneration + processor + chat template
    qwen2_vl/<task>/                 PEFT LoRA adapter on the language model (the expert as trained)
    qwen2_vl/<task>_full/            the same expert merged into full weights (loadable by transformers / lmms-eval)
    internvl/base/, internvl/<task>/ InternVLForConditionalGeneration, full fine-tunes
    logs/<family>_<model>.jsonl      loss curves (step, loss, smoothed loss, lr, elapsed seconds)

The two families train side by side in two single-thread processes (on 2 cores that is faster than one process
with two threads).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .tasks import TASKS

BUILD_VERSION = 3  # bump when the generators, prompts or training change what a build produces
FAMILIES = ("qwen2_vl", "internvl")


@dataclass(frozen=True)
class Profile:
    name: str
    train_n: int  # training samples per task (saved as the train split)
    test_n: int  # test samples per task
    base_steps: int
    expert_steps: int
    batch: int
    base_lr: float
    expert_lr: float  # full fine-tuning (InternVL)
    lora_lr: float  # LoRA (Qwen2-VL)
    lora_r: int
    hidden: int
    layers: int
    vision_depth: int
    vocab: int
    vision_width: int = 64
    seed: int = 0
    # (task, steps) pairs overriding expert_steps: a LoRA learns grounding's box syntax far slower than the rest
    task_steps: tuple = ()

    def steps_for(self, task: str) -> int:
        return dict(self.task_steps).get(task, self.expert_steps)


PROFILES = {
    # Tests: a handful of samples and steps; the models are loadable, not good.
    "micro": Profile("micro", train_n=8, test_n=4, base_steps=2, expert_steps=1, batch=2, base_lr=1e-3,
                     expert_lr=1e-3, lora_lr=1e-3, lora_r=4, hidden=64, layers=1, vision_depth=1, vocab=300,
                     task_steps=(("grounding", 2),)),
    # The benchmark.
    "default": Profile("default", train_n=3000, test_n=200, base_steps=3000, expert_steps=800, batch=32,
                       base_lr=2e-3, expert_lr=7e-4, lora_lr=3e-3, lora_r=16, hidden=128, layers=4, vision_depth=2,
                       vocab=1024, vision_width=128, task_steps=(("grounding", 3000),)),
}  # fmt: skip


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        from .. import MergeError

        raise MergeError(f"minibench: unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


def config_hash(profile: Profile) -> str:
    payload = json.dumps({"version": BUILD_VERSION, **asdict(profile)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ data + tokenizer
def build_datasets(root: Path, profile: Profile) -> None:
    import datasets

    from .tasks import generate

    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "bbox": datasets.Sequence(datasets.Value("float32")),
        "choices": datasets.Sequence(datasets.Value("string")), "task": datasets.Value("string"),
    })  # fmt: skip
    for task in TASKS:
        for split, n in (("train", profile.train_n), ("test", profile.test_n)):
            samples = generate(task, n, profile.seed, split)
            columns = {key: [s[key] for s in samples] for key in features}
            ds = datasets.Dataset.from_dict(columns, features=features)
            ds.save_to_disk(str(root / "data" / task / split))


def tokenizer_corpus(profile: Profile):
    from . import prompts
    from .models import SYSTEM_PROMPT
    from .tasks import generate

    yield f"system\n{SYSTEM_PROMPT}\nuser\nassistant\n"
    for task in TASKS:
        for doc in generate(task, min(profile.train_n, 1000), profile.seed, "train"):
            for family in FAMILIES:
                yield prompts.prompt(task, family, doc)
                yield prompts.target(task, family, doc)
    for doc in generate("caption", 2000, profile.seed, "train"):
        for family in FAMILIES:
            yield prompts.target("caption", family, doc)


def build_tokenizer(root: Path, profile: Profile) -> None:
    from .models import train_tokenizer

    train_tokenizer(tokenizer_corpus(profile), profile.vocab).save_pretrained(root / "tokenizer")


# ------------------------------------------------------------------------------------------ families
def _caption_batches(profile: Profile):
    from .tasks import caption

    def sample(step: int):
        rng = random.Random(f"caption-batch/{profile.seed}/{step}")
        return ["caption"] * profile.batch, [caption(rng) for _ in range(profile.batch)]

    return sample


def _task_batches(root: Path, task: str, profile: Profile):
    import datasets

    ds = datasets.load_from_disk(str(root / "data" / task / "train"))
    docs = [ds[i] for i in range(len(ds))]

    def sample(step: int):
        rng = random.Random(f"{task}-batch/{profile.seed}/{step}")
        return [task] * profile.batch, [docs[rng.randrange(len(docs))] for _ in range(profile.batch)]

    return sample


def save_model_dir(model, processor, path: Path) -> None:
    import torch

    def write(tmp: Path) -> None:
        model.to(torch.float32).save_pretrained(tmp)
        processor.save_pretrained(tmp)

    _atomic_dir(path, write)


def _atomic_dir(path: Path, write) -> None:
    """`write(tmp)` fills a temporary sibling that is then renamed to `path`: a model dir exists only complete."""
    import os

    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def lora_target(model) -> str:
    from ..fixtures import LORA_TARGETS

    return r".*language_model.*\.(" + "|".join(LORA_TARGETS) + r")$"


def build_family(root: str, family: str, profile_name: str, position: int = 0) -> None:
    """Train the base and five experts of `family` under `root/family` (one process, one thread)."""
    import torch
    from transformers import AutoTokenizer

    from .models import make_processor, new_model
    from .train import train_loop

    torch.set_num_threads(1)
    root, profile = Path(root), get_profile(profile_name)
    processor = make_processor(family, AutoTokenizer.from_pretrained(root / "tokenizer"))
    out, logs = root / family, root / "logs"
    sizes = {"hidden": profile.hidden, "layers": profile.layers, "vision_depth": profile.vision_depth,
             "vision_width": profile.vision_width}
    if (out / "base").is_dir():  # resuming an interrupted build: every saved model dir is complete
        from transformers import AutoModelForImageTextToText

        base = AutoModelForImageTextToText.from_pretrained(out / "base", dtype=torch.float32)
        # as a base built in memory: PEFT writes the base's path into each adapter's model card
        base.name_or_path = base.config.name_or_path = ""
    else:
        base = new_model(family, processor.tokenizer, profile.seed, **sizes)
        train_loop(base, family, processor, _caption_batches(profile), steps=profile.base_steps,
                   lr=profile.base_lr, log_path=logs / f"{family}_base.jsonl", desc=f"{family} base",
                   position=position)  # fmt: skip
        save_model_dir(base, processor, out / "base")
    for task in TASKS:
        if (out / task).is_dir() and (family != "qwen2_vl" or (out / f"{task}_full").is_dir()):
            continue  # done before an interruption
        torch.manual_seed(expert_seed(profile, task))
        batches = _task_batches(root, task, profile)
        desc, log_path = f"{family} {task}", logs / f"{family}_{task}.jsonl"
        expert = train_expert(base, family, processor, batches, profile, profile.steps_for(task), log_path, desc,
                              position)  # fmt: skip
        if family == "qwen2_vl":
            def write_adapter(tmp: Path, expert=expert) -> None:
                expert.save_pretrained(tmp)
                _relative_base(tmp)

            _atomic_dir(out / task, write_adapter)
            save_model_dir(expert.merge_and_unload(), processor, out / f"{task}_full")
        else:
            save_model_dir(expert, processor, out / task)


def expert_seed(profile: Profile, task: str) -> int:
    """The torch seed `task`'s expert is trained under (its LoRA init): one per task, whatever else was built."""
    return profile.seed + 1 + TASKS.index(task)


def train_expert(base, family: str, processor, batches, profile: Profile, steps: int, log_path: Path, desc: str,
                 position: int = 0):
    """One expert fine-tuned from a copy of `base`: Qwen2-VL a PEFT LoRA on the language model (as the paper's
    Qwen2-VL experts), InternVL every weight (as its InternVL experts). Seed torch first for a reproducible one."""
    import copy

    from .train import train_loop

    if family == "qwen2_vl":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=profile.lora_r, lora_alpha=2 * profile.lora_r, target_modules=lora_target(base),
                            lora_dropout=0.0)  # fmt: skip
        expert, lr = get_peft_model(copy.deepcopy(base), config), profile.lora_lr
    else:
        expert, lr = copy.deepcopy(base), profile.expert_lr
    train_loop(expert, family, processor, batches, steps=steps, lr=lr, log_path=log_path, desc=desc,
               position=position)  # fmt: skip
    return expert


def _relative_base(adapter_dir: Path) -> None:
    """The adapter names its base relative to itself: the built root moves (temp dir -> cache, or shipped)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "../base"
    path.write_text(json.dumps(config, indent=2))


def _family_worker(args) -> None:
    _exit_with_parent()
    build_family(*args)


def _exit_with_parent() -> None:
    """A worker whose build was interrupted (parent killed) stops instead of training on as an orphan."""
    import os
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def build(root: Path, profile: Profile, parallel: bool = True) -> None:
    """Everything of `profile` into `root` (which must not exist yet); build.json is written last."""
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data.done").exists():  # resuming: datasets and tokenizer are kept once complete
        build_datasets(root, profile)
        build_tokenizer(root, profile)
        (root / "data.done").write_text(config_hash(profile) + "\n")
    jobs = [(str(root), family, profile.name, i) for i, family in enumerate(FAMILIES)]
    if parallel:
        import multiprocessing as mp

        # spawn: fresh interpreters, so each process really runs one thread of its own
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            pool.map(_family_worker, jobs)
    else:
        for job in jobs:
            _family_worker(job)
    (root / "data.done").unlink()
    info = {"profile": asdict(profile), "hash": config_hash(profile), "version": BUILD_VERSION,
            "build_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (root / "build.json").write_text(json.dumps(info, indent=2) + "\n")


def build_atomic(final: Path, profile: Profile, parallel: bool = True) -> Path:
    """Build into a partial sibling directory, then rename into place: `final` only ever exists complete.

    An interrupted build leaves `.<name>.partial-<hash>/` behind, whose finished pieces (datasets, each model
    directory, each written atomically) the next build of the same config resumes from.
    """
    import os

    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.partial-{config_hash(profile)}"
    build(partial, profile, parallel)
    if final.exists():  # an older build (another config, or `make minibench` rebuilding the shipped copy)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old)
    else:
        os.replace(partial, final)
    return final
