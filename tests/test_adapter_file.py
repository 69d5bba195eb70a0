"""The adapter file: round trip, validation against a base, fingerprints, safe parsing."""

import dataclasses
import json
import struct

import numpy as np
import pytest
from factories import random_adapter
from tiny_models import make_model_dir

from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.safetensors_file import SafetensorsFile, save_tensors, serialize
from edge_lora.targets import select_targets


def make_adapter(config, fingerprint=None, ranks=None):
    """Unit-spread LoRA on every decoder linear, rsLoRA; ``ranks`` by short module name (default 4)."""
    ranks = ranks or {}
    return random_adapter(
        config,
        0,
        rank=lambda m: ranks.get(m.rsplit(".", 1)[-1], 4),
        std=1.0,
        rslora=True,
        fingerprint=fingerprint,
    )


def test_round_trip_keeps_everything(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama3"])
    adapter = make_adapter(md.config, md.fingerprint, ranks={"q_proj": 2, "down_proj": 8})
    adapter.save(tmp_path / "a.safetensors")
    back = Adapter.load(tmp_path / "a.safetensors", base=md.config, base_fingerprint=md.fingerprint)
    assert back.rslora and back.base_fingerprint == md.fingerprint
    assert back.modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert back.modules["model.layers.1.mlp.down_proj"].rank == 8
    for m, w in adapter.modules.items():
        np.testing.assert_array_equal(back.modules[m].a, w.a)
        np.testing.assert_array_equal(back.modules[m].b, w.b)
    assert back.scale("model.layers.0.self_attn.q_proj") == pytest.approx(8.0 / np.sqrt(2))
    meta = json.loads(SafetensorsFile(tmp_path / "a.safetensors").metadata["edge_lora"])
    assert meta["format_version"] == 1 and meta["base"]["architecture"] == "LlamaForCausalLM"


def test_fingerprint_depends_on_contents_not_location(model_dirs, tmp_path):
    import shutil

    a = ModelDir(model_dirs["llama"]).fingerprint
    b = ModelDir(shutil.copytree(model_dirs["llama"], tmp_path / "copy")).fingerprint
    assert a == b and a.startswith("sha256:")
    other = make_model_dir(tmp_path / "reseeded", "llama", seed=1)  # same shapes, other weights
    assert a != ModelDir(other).fingerprint


def test_mismatched_base_names_the_base_it_was_made_for(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    make_adapter(md.config, md.fingerprint).save(tmp_path / "a.safetensors")
    other = ModelDir(make_model_dir(tmp_path / "other", "llama", seed=2))
    with pytest.raises(EdgeLoraError, match=r"made for base LlamaForCausalLM sha256:") as err:
        Adapter.load(tmp_path / "a.safetensors", base=other.config, base_fingerprint=other.fingerprint)
    assert str(tmp_path / "a.safetensors") in str(err.value) and "wrong base" in str(err.value)


def test_shapes_that_do_not_fit_are_refused(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    make_adapter(md.config).save(tmp_path / "a.safetensors")
    wider = dataclasses.replace(md.config, hidden_size=128)
    with pytest.raises(EdgeLoraError, match="do not fit"):
        Adapter.load(tmp_path / "a.safetensors", base=wider)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (
            lambda t: t.update(
                {"model.layers.0.self_attn.q_proj.lora_A": np.full((4, 64), np.nan, np.float32)}
            ),
            "NaN",
        ),
        (lambda t: t.pop("model.layers.0.self_attn.q_proj.lora_B"), "both lora_A and lora_B"),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_B": np.zeros((64, 3), np.float32)}),
            "rank",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A": np.zeros((4, 64), np.int32)}),
            "dtype",
        ),
        (
            lambda t: t.update(
                {
                    "model.layers.0.self_attn.zz_proj.lora_A": np.zeros((4, 64), np.float32),
                    "model.layers.0.self_attn.zz_proj.lora_B": np.zeros((64, 4), np.float32),
                }
            ),
            "rank/alpha",
        ),
    ],
)
def test_bad_tensors_are_refused(model_dirs, tmp_path, corrupt, message):
    md = ModelDir(model_dirs["llama"])
    good = make_adapter(md.config)
    good.save(tmp_path / "good.safetensors")
    st = SafetensorsFile(tmp_path / "good.safetensors")
    tensors = {k: st.get(k) for k in st.keys()}
    corrupt(tensors)
    save_tensors(tmp_path / "bad.safetensors", tensors, st.metadata)
    with pytest.raises(EdgeLoraError, match=message):
        Adapter.load(tmp_path / "bad.safetensors", base=md.config)


def test_header_that_lies_about_sizes_is_refused_before_reading(tmp_path):
    blob = serialize({"x": np.zeros((2, 2), np.float32)})
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    header["x"] = {
        "dtype": "F32",
        "shape": [1 << 20, 1 << 20],
        "data_offsets": [0, 4 << 40],
    }  # a 4 TiB "tensor"
    head = json.dumps(header).encode()
    (tmp_path / "bomb.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 16)
    with pytest.raises(EdgeLoraError, match="beyond the file"):
        SafetensorsFile(tmp_path / "bomb.safetensors")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(EdgeLoraError, match="header length"):
        SafetensorsFile(tmp_path / "long.safetensors")


def test_bf16_widens_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bf16.tobytes())
    np.testing.assert_array_equal(SafetensorsFile(tmp_path / "b.safetensors").get("w"), values)


def test_target_specs(model_dirs):
    config = ModelDir(model_dirs["llama"]).config
    layers = config.num_hidden_layers
    assert len(select_targets(config, "all-linear")) == 7 * layers
    assert len(select_targets(config, "attention")) == 4 * layers
    assert select_targets(config, ["q_proj", "v_proj"]) == select_targets(
        config, r"model\.layers\.\d+\.self_attn\.[qv]_proj"
    )
    assert select_targets(config, "q_proj,v_proj") == select_targets(config, ["q_proj", "v_proj"])
    assert select_targets(config, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(EdgeLoraError, match="matches no linear module"):
        select_targets(config, ["nonexistent_proj"])
