"""The shipped model configs compose, and their include/exclude patterns select the paper's tensors."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mmbench_merge.config import register_configs
from mmbench_merge.engine import Selection

CONF = Path(__file__).resolve().parents[1] / "conf"

# Tensor names as they stand in the real checkpoints (Qwen/Qwen2-VL-7B; OpenGVLab/InternVL2_5-1B, internvl_chat,
# where the paper also merges the projector LayerNorm weight mlp1.0.weight).
QWEN2VL_KEYS = {
    "model.layers.0.self_attn.q_proj.weight": True, "model.layers.27.self_attn.o_proj.weight": True,
    "model.layers.3.mlp.gate_proj.weight": True, "model.layers.3.mlp.down_proj.weight": True,
    "model.layers.0.self_attn.q_proj.bias": False, "model.layers.0.input_layernorm.weight": False,
    "model.layers.0.post_attention_layernorm.weight": False, "model.norm.weight": False,
    "model.embed_tokens.weight": False, "lm_head.weight": False, "visual.blocks.0.attn.qkv.weight": False,
    "visual.blocks.0.mlp.fc1.weight": False, "visual.merger.mlp.0.weight": False, "visual.patch_embed.proj.weight": False,
}  # fmt: skip
INTERNVL_KEYS = {
    "language_model.model.layers.0.self_attn.k_proj.weight": True, "language_model.model.layers.23.mlp.up_proj.weight": True,
    "mlp1.1.weight": True, "mlp1.3.weight": True, "mlp1.0.weight": True, "mlp1.0.bias": False, "mlp1.1.bias": False,
    "language_model.model.layers.0.self_attn.q_proj.bias": False, "language_model.model.norm.weight": False,
    "language_model.model.embed_tokens.weight": False, "language_model.lm_head.weight": False,
    "vision_model.encoder.layers.0.attn.qkv.weight": False, "vision_model.encoder.layers.0.mlp.fc1.weight": False,
    "vision_model.embeddings.patch_embedding.weight": False,
}  # fmt: skip


def _compose(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("model,keys", [("qwen2vl", QWEN2VL_KEYS), ("internvl2_5", INTERNVL_KEYS)])
def test_real_model_configs_select_the_language_model_linears(model, keys):
    cfg = _compose(f"model={model}", "evaluator=none", "logger=none", "suite=none")
    assert set(cfg.model.experts) == {"vqa", "geometry", "chart", "ocr", "grounding"}
    selection = Selection(tuple(cfg.model.merge.include), tuple(cfg.model.merge.exclude))
    for name, merged in keys.items():
        assert selection.selects(name) is merged, f"{model}: {name} should {'' if merged else 'not '}be merged"


def test_real_model_configs_name_the_paper_checkpoints():
    qwen = _compose("model=qwen2vl", "evaluator=none", "logger=none", "suite=none").model
    assert (qwen.base, qwen.finetune, qwen.family) == ("Qwen/Qwen2-VL-7B", "lora", "qwen2_vl")
    assert qwen.experts.ocr == "yongxianwei/Qwen2-VL-7B-OCR" and qwen.files_from != "base"
    internvl = _compose("model=internvl2_5", "evaluator=none", "logger=none", "suite=none").model
    assert (internvl.base, internvl.finetune) == ("OpenGVLab/InternVL2_5-1B", "full")
    assert internvl.experts.grounding == "yongxianwei/InternVL2_5-1B_Grounding"


def test_top_level_keys_and_their_types():
    cfg = _compose("model=qwen2vl", "evaluator=none", "logger=none", "suite=none", "seed=3", "device=cpu",
                   "save_merged=true")  # fmt: skip
    assert (cfg.seed, cfg.device, cfg.save_merged) == (3, "cpu", True)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose("model=qwen2vl", "seed=abc")
