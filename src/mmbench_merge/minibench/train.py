"""Training of the MiniBench models on exactly the token sequences lmms-eval's backends produce.

A sample is encoded the way the family's backend encodes it at evaluation time: the same chat messages (Qwen2-VL:
the backend's system turn, the image as a JPEG data URL round trip; InternVL: the image as given), the processor's
chat template with the generation prompt, the processor's image handling; then the target tokens and the
end-of-turn token. Loss is on the target and end-of-turn tokens only, so greedy generation through the backend
reproduces what was trained.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

from . import prompts

JPEG_QUALITY = 85  # lmms-eval's qwen2_vl backend sends every PIL image as a JPEG data URL of this quality
# Every target is written after a space, as each word of a caption is: the answer "red" is then the token "Ġred"
# that the base learned to write, not an unseen "red" whose output row only a full fine-tune (not a LoRA on the
# language model) could train. Every backend and metric strips the space from the decoded answer.
ANSWER_PREFIX = " "


def target_ids(tokenizer, family: str, task: str, doc: dict) -> list[int]:
    """The trained answer tokens: the prefixed target, then the end-of-turn token."""
    ids = tokenizer(ANSWER_PREFIX + prompts.target(task, family, doc), add_special_tokens=False).input_ids
    return ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def backend_image(family: str, image):
    """The pixels the family's backend hands the processor."""
    from PIL import Image

    if family != "qwen2_vl":
        return image
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def backend_messages(family: str, task: str, doc: dict) -> list[dict]:
    """The chat messages the backend builds for one document (its image placement and system turn)."""
    text = prompts.prompt(task, family, doc)
    if family == "qwen2_vl":
        return [{"role": "system", "content": prompts_system()},
                {"role": "user", "content": [{"type": "image", "image": "<image>"}, {"type": "text", "text": text}]}]
    return [{"role": "user", "content": [{"type": "image", "url": "<image>"}, {"type": "text", "text": text}]}]


def prompts_system() -> str:
    from .models import SYSTEM_PROMPT

    return SYSTEM_PROMPT


def encode_prompts(family: str, processor, tasks: list[str], docs: list[dict], padding_side: str = "left"):
    """Processor outputs (input_ids, pixel_values, ...) for the prompts of `docs`, padded, as evaluated."""
    texts = [processor.apply_chat_template(backend_messages(family, t, d), tokenize=False, add_generation_prompt=True)
             for t, d in zip(tasks, docs)]  # fmt: skip
    images = [backend_image(family, d["image"]) for d in docs]
    # padding_side explicitly: InternVLProcessor pads on the left by default whatever the tokenizer says
    return processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt")


def encode_batch(family: str, processor, tasks: list[str], docs: list[dict]):
    """Model inputs and labels for training: prompt tokens, then target + <|im_end|> (the only labelled ones)."""
    import torch

    tok = processor.tokenizer
    inputs = encode_prompts(family, processor, tasks, docs, padding_side="right")
    targets = [target_ids(tok, family, t, d) for t, d in zip(tasks, docs)]
    keep = inputs["attention_mask"].bool()  # the prompt tokens of each row, wherever the padding went
    prompt_ids = [inputs["input_ids"][i][keep[i]] for i in range(len(docs))]
    length = max(len(p) + len(t) for p, t in zip(prompt_ids, targets))
    ids = torch.full((len(docs), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(docs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(docs), length), dtype=torch.long)
    batch = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for key, value in batch.items():  # per-token side inputs (e.g. mm_token_type_ids): 0 over the target
        if value.shape == inputs["input_ids"].shape:
            padded = torch.zeros((len(docs), length), dtype=value.dtype)
            for i in range(len(docs)):
                padded[i, : int(keep[i].sum())] = value[i][keep[i]]
            batch[key] = padded
    for i, (p, t) in enumerate(zip(prompt_ids, targets)):
        n = len(p)
        ids[i, :n] = p
        ids[i, n : n + len(t)] = torch.tensor(t)
        labels[i, n : n + len(t)] = torch.tensor(t)
        mask[i, : n + len(t)] = 1
    batch.update(input_ids=ids, attention_mask=mask, labels=labels)
    return batch


def train_loop(model, family: str, processor, sample_batch, *, steps: int, lr: float, log_path: Path,
               desc: str, position: int = 0, warmup: int = 50) -> list[dict]:
    """AdamW with linear warmup and cosine decay; logs the loss every 10 steps to `log_path` (JSON lines)."""
    import torch
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    model.train()
    log, running, started = [], None, time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file, tqdm(total=steps, desc=desc, position=position, leave=True,
                                                mininterval=2.0, dynamic_ncols=True) as bar:  # fmt: skip
        for step in range(steps):
            tasks, docs = sample_batch(step)
            batch = encode_batch(family, processor, tasks, docs)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            value = loss.item()
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            if step % 10 == 0 or step == steps - 1:
                row = {"step": step, "loss": round(value, 5), "smoothed": round(running, 5),
                       "lr": sched.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - started, 1)}  # fmt: skip
                log.append(row)
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
    model.eval()
    return log
