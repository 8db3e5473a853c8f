"""Checkpoint access: safetensors headers, sharded writing, LoRA adapter densification, resolution, errors."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmbench_merge import MergeError
from mmbench_merge.checkpoints import (
    LoraAdapter,
    SafetensorsCheckpoint,
    ShardedWriter,
    copy_non_weight_files,
    read_safetensors_header,
    resolve,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(32, generator=g),
        "c.bias": torch.randn(5, 3, generator=g).to(torch.float16),
        "d.ids": torch.arange(7, dtype=torch.int64),
        "e.empty": torch.zeros(0, 4),
    }


def test_sharded_writer_round_trip_is_readable_by_safetensors(tmp_path):
    tensors = _tensors()
    layout = [(k, {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}[v.dtype],
               tuple(v.shape)) for k, v in tensors.items()]  # fmt: skip
    writer = ShardedWriter(tmp_path / "out", layout, max_shard_bytes=200)
    for name, t in tensors.items():
        writer.write(name, t)
    out = writer.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2, "expected several shards"
    loaded = {}
    for fname in set(index["weight_map"].values()):
        loaded.update(load_file(out / fname))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary directory left behind"
    # Our own reader agrees with the index.
    ckpt = SafetensorsCheckpoint(out)
    assert ckpt.keys() and torch.equal(ckpt.get("a.weight"), tensors["a.weight"])


def test_sharded_writer_rejects_wrong_shape_and_abort_cleans_up(tmp_path):
    writer = ShardedWriter(tmp_path / "out", [("x", "F32", (2, 2))], max_shard_bytes=1 << 20)
    with pytest.raises(MergeError, match=r"merged tensor x: got F32\[3\], base has F32\[2, 2\]"):
        writer.write("x", torch.zeros(3))
    writer.abort()
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_incomplete_checkpoint_is_never_committed(tmp_path):
    writer = ShardedWriter(tmp_path / "out", [("x", "F32", (2,)), ("y", "F32", (2,))], max_shard_bytes=1 << 20)
    writer.write("x", torch.zeros(2))
    with pytest.raises(MergeError, match="tensor y was never written"):
        writer.commit()
    assert not (tmp_path / "out").exists()


def test_bad_files_give_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MergeError, match=r"model\.safetensors: not a safetensors file"):
        read_safetensors_header(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeError, match=r"empty: no model\.safetensors or model\.safetensors\.index\.json"):
        SafetensorsCheckpoint(empty)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.zeros(2)}, sharded / "model-1.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors",
                                                                                      "b": "model-1.safetensors"}}))
    with pytest.raises(MergeError, match="tensor b is listed but not in model-1.safetensors"):
        SafetensorsCheckpoint(sharded)


def test_resolve_local_and_hub_errors(tmp_path, monkeypatch):
    assert resolve(str(tmp_path)) == tmp_path
    with pytest.raises(MergeError, match="no such checkpoint directory"):
        resolve(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergeError, match="owner/name: could not be fetched from the hub"):
        resolve("owner/name")


def _write_adapter(path: Path, config: dict, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, path / "adapter_model.safetensors")


def _base(path: Path, shapes: dict[str, tuple[int, int]]) -> SafetensorsCheckpoint:
    path.mkdir(parents=True)
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path / "model.safetensors")
    return SafetensorsCheckpoint(path)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scale_honours_alpha_rank_patterns_and_rslora(tmp_path, rslora):
    base = _base(tmp_path / "base", {"m.layers.0.q_proj.weight": (6, 5), "m.layers.0.v_proj.weight": (6, 5)})
    g = torch.Generator().manual_seed(0)
    a_q, b_q = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    a_v, b_v = torch.randn(4, 5, generator=g), torch.randn(6, 4, generator=g)
    config = {"r": 2, "lora_alpha": 8, "use_rslora": rslora, "rank_pattern": {"v_proj": 4},
              "alpha_pattern": {"layers.0.v_proj": 3}}  # fmt: skip
    _write_adapter(tmp_path / "ad", config, {"m.layers.0.q_proj": (a_q, b_q), "m.layers.0.v_proj": (a_v, b_v)})
    adapter = LoraAdapter(tmp_path / "ad", base)
    root = (lambda r: r**0.5) if rslora else (lambda r: r)
    torch.testing.assert_close(adapter.delta("m.layers.0.q_proj.weight"), (8 / root(2)) * b_q @ a_q)
    torch.testing.assert_close(adapter.delta("m.layers.0.v_proj.weight"), (3 / root(4)) * b_v @ a_v)
    assert adapter.delta("m.layers.0.k_proj.weight") is None


def test_adapter_errors_name_the_module(tmp_path):
    base = _base(tmp_path / "base", {"x.weight": (4, 4)})
    _write_adapter(tmp_path / "ad1", {"r": 2, "lora_alpha": 2}, {"y": (torch.zeros(2, 4), torch.zeros(4, 2))})
    with pytest.raises(MergeError, match="module y matches no tensor of the base checkpoint"):
        LoraAdapter(tmp_path / "ad1", base)
    _write_adapter(tmp_path / "ad2", {"r": 2, "lora_alpha": 2}, {"x": (torch.zeros(2, 3), torch.zeros(4, 2))})
    with pytest.raises(MergeError, match=r"x gives a delta of shape \(4, 3\) but base tensor x.weight has shape \(4, 4\)"):
        LoraAdapter(tmp_path / "ad2", base)
    (tmp_path / "ad3").mkdir()
    (tmp_path / "ad3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(MergeError, match="peft_type 'IA3' is not supported"):
        LoraAdapter(tmp_path / "ad3", base)


def test_adapter_from_peft_maps_transformers5_names_to_checkpoint_names(tiny_root):
    """PEFT names modules `model.language_model.layers...`; the checkpoint says `model.layers...`."""
    from mmbench_merge.families import FAMILIES, attribute_names

    base = SafetensorsCheckpoint(tiny_root / "qwen2_vl" / "base")
    adapter_dir = tiny_root / "qwen2_vl" / "ocr"
    raw_keys = list(read_safetensors_header(adapter_dir / "adapter_model.safetensors"))
    assert any(".language_model.layers." in k for k in raw_keys)
    adapter = LoraAdapter(adapter_dir, base, attribute_names(FAMILIES["qwen2_vl"], base.path, base.keys()))
    assert adapter.modules and all(name.startswith("model.layers.") for name in adapter.modules)
    # The dense delta equals what PEFT itself merged in (stored in bf16 in ocr_merged).
    merged = SafetensorsCheckpoint(tiny_root / "qwen2_vl" / "ocr_merged")
    name = "model.layers.1.mlp.down_proj.weight"
    expected = merged.get(name).float() - base.get(name).float()
    torch.testing.assert_close(adapter.delta(name), expected, atol=2e-2, rtol=0)


def test_copy_non_weight_files_skips_weights_and_adapters(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ["config.json", "tokenizer.json", "chat_template.jinja", "modeling_x.py", "model.safetensors",
                 "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin"]:
        (src / name).write_text("x")
    dst = tmp_path / "dst"
    dst.mkdir()
    assert sorted(copy_non_weight_files(src, dst)) == ["chat_template.jinja", "config.json", "modeling_x.py",
                                                      "tokenizer.json"]


def test_header_reader_matches_safetensors(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    header = read_safetensors_header(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert set(header) == set(f.keys())
        for k in f.keys():
            assert list(header[k][1]) == list(f.get_slice(k).get_shape())
    # A truncated header length is caught.
    (tmp_path / "trunc.safetensors").write_bytes(struct.pack("<Q", 10**12))
    with pytest.raises(MergeError, match="trunc.safetensors: not a safetensors file"):
        read_safetensors_header(tmp_path / "trunc.safetensors")
