"""Modality merging (OptMerge's third experiment): the vision, audio and video LoRAs of one Vicuna, each with
its own projector (ModelCompose checkpoints), merged into one omni model that sees, hears and watches.

    checkpoint.py  read a modality folder (adapter_model.bin / .safetensors + config.json); split the keys
    merge.py       factor-space (A and B separately, as the paper) or product-space merge; the omni folder
    encoders.py    BEATs, the LanguageBind video tower, the audio Q-Former, the mlp2x_gelu projector
    runtime.py     the omni model: a Llama with the merged LoRA folded in, encoders, placeholder splicing
    backend.py     the lmms-eval model backend `mmbench_omni`
    fixtures.py    tiny omni checkpoints in the real key layout (tests, demo)

Importing this package is cheap: torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

OMNI_FAMILY = "omni"
MODALITIES = ("vision", "audio", "video")
PLACEHOLDERS = {"vision": "<image>", "audio": "<audio>", "video": "<video>"}
# The lmms-eval backend name this project registers for the omni model.
BACKEND_NAME = "mmbench_omni"
# Merge spaces: "factor" = the paper (A and B merged separately); the product spaces merge dW = (alpha/r) B A.
MERGE_SPACES = ("factor", "product_dense", "product_svd")


def is_omni(model_cfg) -> bool:
    return model_cfg.get("family") == OMNI_FAMILY
