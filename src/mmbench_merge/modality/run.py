"""The runner's omni path: merge the modality LoRAs (or take one expert), and hand the result to the evaluator.

The merge stays in memory unless `save_merged=true` (then `<run dir>/merged/` is the written omni folder); in
memory, `<run dir>/omni/omni_config.json` describes the model for the lmms-eval backend and the weights travel
as `PreparedModel.state_dict` (no checkpoint written).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import MergeError

log = logging.getLogger("mmbench_merge")


def prepare_omni(cfg, method_cfg: dict, run_dir: Path, device: str):
    from ..results import MERGE_REPORT_FILE, write_json_atomic
    from ..runner import PreparedModel
    from .merge import merge_omni, state_dict_of, write_omni

    method = method_cfg["name"]
    if method == "base":
        raise MergeError("method=base: the omni model has no base without a modality LoRA; use method=expert "
                         "method.expert=vision|audio|video for the one-modality reference rows")  # fmt: skip
    only = method_cfg.get("expert") if method == "expert" else None
    if method == "expert" and not only:
        raise MergeError("method.expert: name the modality (vision, audio or video)")
    if method == "expert" and cfg.evaluator.name == "none":
        raise MergeError("method=expert: evaluates an unmerged model and needs an evaluator (got evaluator=none)")
    merge = merge_omni(cfg.model, method_cfg, seed=cfg.seed, device=device, only=only, progress=True)
    if only is None:
        write_json_atomic(run_dir / MERGE_REPORT_FILE, merge.report)
    totals = merge.report["totals"]
    log.info("merged %d LoRA tensors (%s space), carried %d projector tensors, in %.1fs, peak RSS %.0f MB",
             totals["merged"], merge.space, totals["kept"], totals["seconds"], totals["peak_rss_mb"])  # fmt: skip
    if cfg.save_merged:
        folder = write_omni(merge, run_dir / "merged")
        log.info("omni checkpoint at %s", folder)
        return PreparedModel(model_dir=folder, base_dir=folder, files_dir=folder,
                             report=merge.report if only is None else None)  # fmt: skip
    view = run_dir / "omni"
    view.mkdir(parents=True, exist_ok=True)
    (view / "omni_config.json").write_text(json.dumps(merge.omni_config(weights=False), indent=2))
    return PreparedModel(model_dir=view, base_dir=view, files_dir=view, state_dict=state_dict_of(merge),
                         report=merge.report if only is None else None)  # fmt: skip
