"""The omni model as an lmms-eval backend, `mmbench_omni`.

`pretrained` is an omni folder (omni_config.json, with or without weights). With weights the backend folds
them in when it is built; without, the runner hands it the merge kept in memory through `load_merged_weights`
(evaluation/lmms.py), so nothing is written. A task's `doc_to_visual` returns the document's modal inputs,
{"vision": [...], "audio": [...], "video": [...]} (file paths, PIL images or (waveform, rate) pairs), and its
`doc_to_text` the user turn with `<image>` / `<audio>` / `<video>` placeholders; the vicuna_v1 template is
applied here. The project registers the backend with lmms-eval's model registry (`register`) and also
declares it as an `lmms_eval.models` entry point (pyproject.toml).
"""

from __future__ import annotations

import logging

from lmms_eval.api.model import lmms

from .. import MergeError
from . import BACKEND_NAME

log = logging.getLogger("mmbench_merge")


def manifest():
    """The entry-point payload: lmms-eval's manifest of this backend."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=BACKEND_NAME, simple_class_path=f"{__name__}.OmniLMM")


def register() -> None:
    """Make `mmbench_omni` known to lmms-eval's registry in this process (idempotent)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


class OmniLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int = 1, dtype: str = "float32",
                 max_new_tokens: int = 128, revision: str | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__()
        from .merge import read_omni
        from .runtime import OmniModel

        if int(batch_size) != 1:
            raise MergeError(f"evaluator.batch_size: the omni backend decodes one prompt at a time (got {batch_size})")
        omni_cfg, merge = read_omni(pretrained)
        self.omni_cfg = omni_cfg
        self._model = OmniModel.from_config(omni_cfg, device=device, dtype=dtype, revision=revision)
        self.max_new_tokens = int(max_new_tokens)
        if merge is not None:
            self._model.load_merge(merge)
        self.loaded = merge is not None

    @property
    def model(self):
        return self._model

    def load_merged_weights(self, state_dict: dict) -> int:
        """Fold a merge held in memory (LoRA factors, dense updates and projectors under their checkpoint names)."""
        from .merge import merged_from_state

        n = self._model.load_merge(merged_from_state(self.omni_cfg, state_dict))
        self.loaded = True
        return n

    def generate_until(self, requests) -> list[str]:
        if not self.loaded:
            raise MergeError("omni backend: no merged weights were loaded (omni_config.json lists no weight files)")
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            inputs = doc_to_visual(doc) if doc_to_visual is not None else {}
            if not isinstance(inputs, dict):
                inputs = {"vision": list(inputs or [])}
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            answer = self._model.generate(context, inputs, until=until,
                                          max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens))  # fmt: skip
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answers

    def generate_until_multi_round(self, requests) -> list[str]:
        return self.generate_until(requests)

    def loglikelihood(self, requests):
        raise NotImplementedError("the omni backend only generates (output_type: generate_until)")
