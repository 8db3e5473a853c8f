"""Modality merging (issue 16) on a tiny omni fixture in the real ModelCompose key layout.

Each check compares against an independent formula (float64 where the formula allows) or, for methods whose
formula is the registry function itself, against calling that function on the A and the B factors separately.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mmbench_merge import MergeError  # noqa: E402
from mmbench_merge.modality import checkpoint as ckpt  # noqa: E402
from mmbench_merge.modality import fixtures as fx  # noqa: E402

ALL_METHODS = ["weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties",
               "tsv", "iso_c", "iso_cts", "wudi", "optmerge"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> dict:
    return fx.make_omni(tmp_path_factory.mktemp("omni"))


def model_cfg(paths: dict, **over):
    from omegaconf import OmegaConf

    cfg = {"name": "tiny_omni", "family": "omni", "finetune": "modality", "base": paths["base"],
           "experts": dict(paths["experts"]), "encoders": dict(paths["encoders"]), "merge_space": "factor",
           "revision": None}  # fmt: skip
    cfg.update(over)
    return OmegaConf.create(cfg)


def method_cfg(name: str, **over) -> dict:
    from dataclasses import asdict

    from mmbench_merge.config import METHOD_SCHEMAS

    cfg = asdict(METHOD_SCHEMAS[name]())
    cfg.update(over)
    return cfg


def experts(paths):
    return ckpt.read_modalities({k: Path(v) for k, v in paths["experts"].items()})


# ------------------------------------------------------------------------------------------ reading
def test_key_split_shared_lora_unique_projectors(omni):
    cks = experts(omni)
    assert [ck.modality for ck in cks] == ["vision", "audio", "video"]
    split = ckpt.split_keys(cks)
    assert sorted(split.shared) == sorted(fx.lora_keys()) and len(split.shared) == 28
    for modality in ("vision", "audio", "video"):
        assert sorted(split.unique[modality]) == sorted(fx.projector_keys(modality))
    assert len(split.unique["audio"]) == 58 and len(split.unique["vision"]) == 4


def test_key_in_two_of_three_is_one_error_naming_it(omni, tmp_path):
    cks = experts(omni)
    extra = "model.modal_projectors.shared_by_two.weight"
    for ck in cks[:2]:
        ck.tensors[extra] = torch.zeros(2)
    with pytest.raises(MergeError, match=r"key model\.modal_projectors\.shared_by_two\.weight is in vision, audio but not in video"):
        ckpt.split_keys(cks)


def test_code_running_pickle_is_refused(omni, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "multimodal-evil-vision-naivemc"
    shutil.copytree(omni["experts"]["vision"], folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"model.x.lora_A.default.weight": Evil()}))
    with pytest.raises(MergeError, match=r"adapter_model\.bin: refused: not loadable with torch\.load\(weights_only=True\)"):
        ckpt.read_modality(folder)
    assert not marker.exists()


def test_safetensors_copy_reads_the_same_tensors(omni, tmp_path):
    bin_ck = ckpt.read_modality(omni["experts"]["audio"])
    folder = fx.write_modality(tmp_path / "st-audio", "audio", "enc", seed=2, fmt="safetensors")  # seed 2 = audio
    st_ck = ckpt.read_modality(folder)
    assert st_ck.file.name == "adapter_model.safetensors" and st_ck.modality == "audio"
    assert set(st_ck.tensors) == set(bin_ck.tensors)
    for name, value in bin_ck.tensors.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value.view(torch.int16), st_ck.tensors[name].view(torch.int16)), name


def test_modality_comes_from_the_first_non_empty_encoder_field(tmp_path):
    assert ckpt.modality_of({"mm_vision_encoder": None, "mm_vision_tower": "", "mm_video_encoder": "x"}, tmp_path) == "video"
    assert ckpt.modality_of({"mm_vision_tower": "clip", "mm_audio_encoder": "beats"}, tmp_path) == "vision"
    with pytest.raises(MergeError, match="cannot tell its modality"):
        ckpt.modality_of({"mm_vision_encoder": None}, tmp_path)


def test_expert_listed_under_the_wrong_modality_is_refused(omni):
    with pytest.raises(MergeError, match="serves modality 'vision', not 'audio'"):
        ckpt.read_modalities({"audio": Path(omni["experts"]["vision"])})


# ------------------------------------------------------------------------------------------ factor space
def _expected_factor(name, cks, fn, kwargs, scaling, seed=0):
    from mmbench_merge.engine import tensor_seed

    taus = [ck.tensors[name].float() for ck in cks]
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return (scaling * fn(taus, generator=gen, **kwargs)).to(torch.bfloat16)


def _independent(name: str, taus: list, scaling: float):
    """Closed forms in float64, written here without the registry (None where the method has none)."""
    t = [x.double() for x in taus]
    if name == "weight_average":
        return sum(t) / len(t)
    if name == "task_arithmetic":
        return scaling * sum(t)
    if name == "ties":  # per key, the paper's count: keep |x| >= the int(0.8 n)-th smallest; sign of the sum
        trimmed = []
        for x in t:
            rank = int(x.numel() * (1 - 0.2))
            thr = x.abs().flatten().sort().values[rank - 1]
            trimmed.append(torch.where(x.abs() >= thr, x, torch.zeros_like(x)))
        stack = torch.stack(trimmed)
        sign = torch.sign(stack.sum(0))
        majority = torch.sign((sign > 0).sum() - (sign < 0).sum())  # an exact-zero sum takes the majority sign
        sign = torch.where(sign == 0, majority.to(sign.dtype), sign)
        agree = (torch.sign(stack) == sign) & (stack != 0)
        return scaling * (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    if name == "iso_c":
        u, s, vh = torch.linalg.svd(sum(t), full_matrices=False)
        return scaling * s.mean() * (u @ vh)
    return None


@pytest.mark.parametrize("name", ALL_METHODS)
def test_factor_space_applies_each_method_to_A_and_B_separately(omni, name):
    from mmbench_merge.methods import resolve_method
    from mmbench_merge.modality.merge import merge_omni

    over = {"iters": 30} if name in ("wudi", "optmerge") else {}
    mcfg = method_cfg(name, **over)
    merge = merge_omni(model_cfg(omni), mcfg, seed=3)
    fn, kwargs, scaling = resolve_method(mcfg, "modality")
    cks = experts(omni)
    assert sorted(merge.lora) == sorted(fx.lora_keys())
    for key in fx.lora_keys():
        got = merge.lora[key]
        assert got.dtype == torch.bfloat16 and tuple(got.shape) == fx.lora_keys()[key]
        want = _expected_factor(key, cks, fn, kwargs, scaling, seed=3)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0, msg=f"{name} {key}")
        formula = _independent(name, [ck.tensors[key].float() for ck in cks], scaling)
        if formula is not None:
            torch.testing.assert_close(got.float(), formula.float().to(torch.bfloat16).float(), rtol=2e-2, atol=2e-3,
                                       msg=f"{name} {key} vs its closed form")  # fmt: skip
    assert merge.report["params"]["merge_space"] == "factor"


def test_optmerge_modality_preset_is_the_papers_wudi2(omni):
    """The preset, and one key against an independent float64 autograd run of the paper's loop."""
    from mmbench_merge.methods import resolve_method
    from mmbench_merge.modality.merge import merge_omni

    mcfg = method_cfg("optmerge")
    _, kwargs, scaling = resolve_method(mcfg, "modality")
    assert scaling == 1.0
    assert kwargs == {"rank_fraction": 0.2, "center": False, "init": "mean", "optimizer": "sgd", "lr": 5e-2,
                      "momentum": 0.9, "iters": 300, "projector": "full", "solver": "loop"}  # fmt: skip
    merge = merge_omni(model_cfg(omni, experts=omni["experts"]), mcfg)
    cks = experts(omni)
    for key in ("model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.layers.1.mlp.down_proj.lora_B.default.weight"):
        taus = [ck.tensors[key].double() for ck in cks]
        k = int(min(taus[0].shape) / 5)  # floor(min / 5) = 2 for r = 10
        targets = []
        for tau in taus:
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            targets.append(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
        m = (sum(taus) / 3).clone().requires_grad_(True)
        opt = torch.optim.SGD([m], lr=5e-2, momentum=0.9)
        for _ in range(300):
            opt.zero_grad()
            loss = sum(((m - tt) @ tau.T).pow(2).sum() / tau.pow(2).sum() for tt, tau in zip(targets, taus))
            loss.backward()
            opt.step()
        torch.testing.assert_close(merge.lora[key].float(), m.detach().float(), rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------------------ product space
def test_product_space_dense_and_refactorised(omni):
    from mmbench_merge.modality.merge import merge_omni

    cks = experts(omni)
    s = fx.ALPHA / fx.R
    module = "model.layers.1.mlp.gate_proj"
    dws = [s * ck.tensors[f"{module}.lora_B.default.weight"].double() @ ck.tensors[f"{module}.lora_A.default.weight"].double()
           for ck in cks]  # fmt: skip
    want = sum(dws)  # task arithmetic, scaling 1, of the products

    dense = merge_omni(model_cfg(omni, merge_space="product_dense"), method_cfg("task_arithmetic", scaling=1.0))
    assert not dense.lora and len(dense.dense) == 14
    torch.testing.assert_close(dense.dense[f"{module}.weight"].double(), want, rtol=1e-2, atol=1e-4)
    assert dense.report["params"]["merge_space"] == "product_dense"

    svd = merge_omni(model_cfg(omni, merge_space="product_svd"), method_cfg("task_arithmetic", scaling=1.0))
    a = svd.lora[f"{module}.lora_A.default.weight"]
    b = svd.lora[f"{module}.lora_B.default.weight"]
    assert a.shape == (fx.R, fx.H) and b.shape == (fx.INTER, fx.R) and a.dtype == torch.bfloat16
    u, sv, vh = torch.linalg.svd(want, full_matrices=False)
    best = u[:, : fx.R] @ torch.diag(sv[: fx.R]) @ vh[: fx.R]  # Eckart-Young: the best rank-r approximation
    got = s * b.double() @ a.double()
    assert (got - best).norm() / best.norm() < 2e-2
    assert (want - best).norm() > 0.05 * want.norm()  # the truncation is real: rank 30 cut to 10
    # and the factor-space merge differs from the product-space one (the cross terms)
    factor = merge_omni(model_cfg(omni), method_cfg("task_arithmetic", scaling=1.0))
    cross = factor.deltas()[f"{module}.weight"].double()
    assert (cross - want).norm() > 0.1 * want.norm()


# ------------------------------------------------------------------------------------------ the omni folder
def test_written_folder_projectors_byte_identical_and_config(omni, tmp_path):
    from mmbench_merge.modality.merge import merge_omni, read_omni, write_omni

    merge = merge_omni(model_cfg(omni), method_cfg("ties"))
    out = write_omni(merge, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directory left
    from safetensors.torch import load_file

    projectors = load_file(str(out / "projectors.safetensors"))
    cks = experts(omni)
    union = set()
    for ck in cks:
        for name in fx.projector_keys(ck.modality):
            src = ck.tensors[name]
            assert projectors[name].dtype == torch.bfloat16 and projectors[name].shape == src.shape
            assert torch.equal(projectors[name].view(torch.int16), src.view(torch.int16)), name
            union.add(name)
    assert projectors["model.modal_projectors.audio.audio_query_tokens"].dim() == 3
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert set(adapter) == {f"base_model.model.{k.replace('.default.weight', '.weight')}" for k in fx.lora_keys()}
    assert set(projectors) == union  # output keys = the union: LoRA + every projector
    cfg = json.loads((out / "omni_config.json").read_text())
    assert {m: (i["encoder_type"], i["projector_type"], i["encoder"]) for m, i in cfg["modalities"].items()} == {
        "vision": ("clip", "mlp2x_gelu", omni["encoders"]["vision"]),
        "audio": ("beats", "qformer_4N_2L", omni["encoders"]["audio"]),
        "video": ("languagebind_video", "mlp2x_gelu", omni["encoders"]["video"])}  # fmt: skip
    paper = json.loads((out / "config.json").read_text())  # first truthy value wins; <modality>_lora_{r,alpha}
    assert paper["mm_vision_encoder"] == "/author/path/vision-encoder"
    assert paper["mm_audio_encoder"] == "/author/path/audio-encoder" and paper["mm_video_encoder"]
    assert paper["audio_lora_r"] == fx.R and paper["video_lora_alpha"] == fx.ALPHA
    _, back = read_omni(out)
    for k, v in merge.lora.items():
        assert torch.equal(back.lora[k].view(torch.int16), v.view(torch.int16))


def test_failed_verification_leaves_no_folder(omni, tmp_path, monkeypatch):
    from mmbench_merge.modality import merge as mm

    merge = mm.merge_omni(model_cfg(omni), method_cfg("weight_average"))

    def broken(path, merge):
        raise MergeError(f"{path}: tensor x does not read back as written")

    monkeypatch.setattr(mm, "verify_omni", broken)
    with pytest.raises(MergeError, match="does not read back"):
        mm.write_omni(merge, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ runtime
@pytest.fixture(scope="module")
def merged_folder(omni, tmp_path_factory):
    from mmbench_merge.modality.merge import merge_omni, write_omni

    merge = merge_omni(model_cfg(omni), method_cfg("task_arithmetic", scaling=1.0))
    return write_omni(merge, tmp_path_factory.mktemp("omni_out") / "merged")


def test_folded_llama_gives_the_logits_of_the_unfolded_lora(omni, merged_folder):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from mmbench_merge.modality.merge import read_omni
    from mmbench_merge.modality.runtime import OmniModel

    ids = torch.tensor([[1, 40, 41, 42, 3, 50, 60, 70, 80]])
    base = LlamaForCausalLM.from_pretrained(omni["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits
    lora = PeftModel.from_pretrained(base, str(merged_folder)).eval()  # W x + (alpha/r) B (A x), unfolded
    with torch.no_grad():
        unfolded = lora(ids).logits
    cfg, merge = read_omni(merged_folder)
    model = OmniModel.from_config(cfg)
    assert model.load_merge(merge) == 14 + 66
    with torch.no_grad():
        folded = model.llm(ids).logits
    assert (unfolded - plain).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)


def test_placeholders_spliced_in_order_with_their_token_counts(omni, merged_folder):
    from mmbench_merge.modality.merge import read_omni
    from mmbench_merge.modality.runtime import OmniModel

    cfg, merge = read_omni(merged_folder)
    model = OmniModel.from_config(cfg)
    model.load_merge(merge)
    media = Path(omni["data"]) / "media"
    inputs = {"vision": [media / "0.png", media / "1.png"], "audio": [media / "0.wav"], "video": [media / "2.mp4"]}
    prompt = "ab<video>c<image>de<audio><image>f"
    emb, spans = model.embed(prompt, inputs)
    assert [(w, n) for w, _, n in spans] == [("text", 3), ("video", 2 * 5), ("text", 1), ("vision", 4), ("text", 2),
                                             ("audio", 4), ("vision", 4), ("text", 1)]  # fmt: skip
    assert emb.shape == (1, sum(n for *_, n in spans), fx.H)
    blocks = {"video": [media / "2.mp4"], "vision": [media / "0.png", media / "1.png"], "audio": [media / "0.wav"]}
    for what, start, n in spans:
        if what != "text":
            torch.testing.assert_close(emb[0, start:start + n], model.features(what, blocks[what].pop(0)))
    # the two images differ, so a swapped order would show
    assert not torch.allclose(model.features("vision", media / "0.png"), model.features("vision", media / "1.png"))
    with pytest.raises(MergeError, match="more <image> placeholders than vision inputs"):
        model.embed("<image><image><image>", inputs)


def test_one_modality_model_drops_other_placeholders(omni):
    from mmbench_merge.modality.merge import merge_omni
    from mmbench_merge.modality.runtime import OmniModel

    merge = merge_omni(model_cfg(omni), {"name": "expert", "expert": "audio"}, only="audio")
    assert set(merge.modalities) == {"audio"} and sorted(merge.lora) == sorted(fx.lora_keys())
    cks = {ck.modality: ck for ck in experts(omni)}
    for k, v in merge.lora.items():
        assert torch.equal(v.view(torch.int16), cks["audio"].tensors[k].view(torch.int16))  # the expert unchanged
    model = OmniModel.from_config(merge.omni_config(weights=False))
    model.load_merge(merge)
    media = Path(omni["data"]) / "media"
    _, spans = model.embed("x<image>y<audio>z<video>", {"audio": [media / "1.wav"]})
    assert [(w, n) for w, _, n in spans] == [("text", 2), ("text", 1), ("audio", 4), ("text", 1)]


def test_encoder_modules_use_the_released_key_names():
    from mmbench_merge.modality.encoders import AudioQFormer, Beats, LanguageBindVideo

    state = {k: torch.zeros(v) for k, v in fx.qformer_keys().items()}
    qformer = AudioQFormer.from_state(state, "test")
    assert set(qformer.state_dict()) == set(fx.qformer_keys())
    beats = set(Beats(fx.BEATS_CFG).released_state_dict())
    for key in ("patch_embedding.weight", "layer_norm.weight", "post_extract_proj.weight", "encoder.pos_conv.0.weight_g",
                "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias", "encoder.layer_norm.bias",
                "encoder.layers.0.self_attn.relative_attention_bias.weight", "encoder.layers.1.self_attn.grep_a",
                "encoder.layers.1.self_attn.grep_linear.weight", "encoder.layers.1.self_attn_layer_norm.weight",
                "encoder.layers.1.fc1.weight", "encoder.layers.1.final_layer_norm.bias"):  # fmt: skip
        assert key in beats, key
    assert "encoder.layers.1.self_attn.relative_attention_bias.weight" not in beats  # shared from layer 0
    video = set(LanguageBindVideo(fx.VIDEO_CFG).released_state_dict())
    for key in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
                "vision_model.encoder.layers.0.temporal_embedding", "vision_model.encoder.layers.0.temporal_attn.q_proj.weight",
                "vision_model.encoder.layers.1.temporal_layer_norm1.bias", "vision_model.encoder.layers.1.mlp.fc2.weight",
                "vision_model.post_layernorm.weight"):  # fmt: skip
        assert key in video, key
    missing = {k: v for k, v in state.items() if "crossattention.self.key" not in k}
    with pytest.raises(MergeError, match="crossattention.self.key"):
        AudioQFormer.from_state(missing, "audio projector")


def test_fbank_puts_a_tone_in_its_mel_band():
    from mmbench_merge.modality.encoders import _mel, kaldi_fbank

    t = torch.arange(16000, dtype=torch.float64) / 16000
    fb = kaldi_fbank(torch.sin(2 * torch.pi * 1000 * t) * 10000, 16000, 128)
    assert fb.shape == (98, 128)  # 1 + (16000 - 400) // 160 frames
    mel_low, mel_high = _mel(torch.tensor(20.0)), _mel(torch.tensor(8000.0))
    centre = (_mel(torch.tensor(1000.0)) - mel_low) / ((mel_high - mel_low) / 129) - 1
    assert abs(int(fb.mean(0).argmax()) - float(centre)) <= 1


def test_paper_metrics():
    from mmbench_merge.modality.tasks import avqa_score, music_avqa_score

    assert music_avqa_score("Yes.", "yes") == 1.0 and music_avqa_score("two", "2") == 1.0
    assert music_avqa_score("three", "two") == 0.0
    assert avqa_score("A) dog", "A") == 1.0 and avqa_score("a", "A") == 0.0 and avqa_score("B", "A") == 0.0
