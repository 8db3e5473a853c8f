"""Qwen2-VL as the paper's experts ship it: LLaMA-Factory exports (LoRA merged into full weights, saved sharded
in the transformers-4.45 names `model.layers.*`, `visual.*`, `lm_head.weight`), the base's chat template unusable
for role messages, the experts' ChatML one. The merge uses conf/model/qwen2vl.yaml's own selection."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_TEMPLATE = ("{% if messages is string %}{{ messages }}{% else %}{% for content in messages %}"
                 "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                 "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}")  # fmt: skip
EXPERT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                   "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                   "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                   "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from mmbench_merge.fixtures import make_family

    root = tmp_path_factory.mktemp("qwen2vl_exports")
    paths = make_family(root, "qwen2_vl", max_shard_size="60KB", lora_expert=None)
    # The base (Qwen/Qwen2-VL-7B) ships a legacy chat_template.json; a 5.x-saved expert a chat_template.jinja,
    # the others (LLaMA-Factory on 4.45) a chat_template.json.
    (Path(paths["base"]) / "chat_template.json").write_text(json.dumps({"chat_template": BASE_TEMPLATE}))
    for task, expert in paths["experts"].items():
        if task == "vqa":
            (Path(expert) / "chat_template.jinja").write_text(EXPERT_TEMPLATE)
        else:
            (Path(expert) / "chat_template.json").write_text(json.dumps({"chat_template": EXPERT_TEMPLATE}))
    return paths


def model_cfg(paths, files_from):
    from omegaconf import OmegaConf

    from mmbench_merge.config import ModelConfig

    loaded = OmegaConf.load(REPO / "conf" / "model" / "qwen2vl.yaml")
    loaded.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)
    cfg.base, cfg.experts, cfg.files_from, cfg.dtype = paths["base"], dict(paths["experts"]), files_from, "float32"
    return cfg


def render(template: str) -> str:
    import jinja2

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    return jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)


def test_exports_are_sharded_in_the_4_45_names(exports):
    from mmbench_merge.checkpoints import WEIGHTS_INDEX_NAME, SafetensorsCheckpoint

    for path in [exports["base"], *exports["experts"].values()]:
        index = json.loads((Path(path) / WEIGHTS_INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) > 1
        names = SafetensorsCheckpoint(Path(path)).keys()
        assert {"model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight", "lm_head.weight",
                "model.embed_tokens.weight", "visual.merger.mlp.0.weight"} <= set(names)  # fmt: skip
        assert not any(n.startswith("model.language_model.") for n in names)
    assert render(BASE_TEMPLATE).strip() == ""  # role messages match no branch of the base's template


@pytest.mark.parametrize("files_from", ["vqa", "chart"])
def test_merge_takes_the_chat_template_from_the_expert(exports, tmp_path, files_from):
    from mmbench_merge.checkpoints import SafetensorsCheckpoint
    from mmbench_merge.engine import merge_model

    result = merge_model(model_cfg(exports, files_from), {"name": "task_arithmetic", "scaling": 0.5},
                         out_dir=tmp_path / "merged")  # fmt: skip
    merged = result.merged_dir
    templates = sorted(p.name for p in merged.iterdir() if p.name.startswith("chat_template"))
    if files_from == "vqa":  # the base's legacy .json would override the expert's .jinja: it must be gone
        assert templates == ["chat_template.jinja"]
        assert (merged / "chat_template.jinja").read_text() == EXPERT_TEMPLATE
    else:
        assert templates == ["chat_template.json"]
        assert json.loads((merged / "chat_template.json").read_text())["chat_template"] == EXPERT_TEMPLATE
    assert render(EXPERT_TEMPLATE).startswith("<|im_start|>user\nWhat is shown?")
    # conf/model/qwen2vl.yaml's selection on these names: exactly the LLM's q/k/v/o/gate/up/down weights.
    merged_names = {t["name"] for t in result.report.to_json()["tensors"] if t["merged"]}
    layers = 2
    assert len(merged_names) == 7 * layers
    assert all(n.startswith("model.layers.") and n.endswith("_proj.weight") for n in merged_names)
    assert len(SafetensorsCheckpoint(merged).keys()) == len(SafetensorsCheckpoint(Path(exports["base"])).keys())


def test_in_memory_view_takes_the_template_from_files_from_alone(exports):
    from contextlib import ExitStack

    from mmbench_merge.evaluation.lmms import model_view
    from mmbench_merge.runner import PreparedModel

    prepared = PreparedModel(model_dir=None, base_dir=Path(exports["base"]), files_dir=Path(exports["experts"]["vqa"]),
                             state_dict={})  # fmt: skip
    with ExitStack() as stack:
        view = Path(model_view(prepared, stack))
        assert sorted(p.name for p in view.iterdir() if p.name.startswith("chat_template")) == ["chat_template.jinja"]
        assert (view / "chat_template.jinja").read_text() == EXPERT_TEMPLATE
