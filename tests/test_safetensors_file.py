"""edge_lora.safetensors_file: the ``safetensors`` library validates and reads, our layer adds the rest.

Fingerprints are pinned to the values the hand-written reader gave: bundles and adapters store them,
so a change of reader must not change a single one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from security_helpers import make_adapter

from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.safetensors_file import RAW_CHUNK, SafetensorsFile, save_tensors, serialize

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "edge_lora" / "assets" / "default_model"
DEFAULT_FINGERPRINT = "sha256:0d3f12b10662c93c9018fb36498d2dd2691ec36f501e1614af479d6fc4b07464"
# the default model's tensors written by torch's safetensors.torch.save_file as bf16
DEFAULT_BF16_FINGERPRINT = "sha256:fbdcf8f5a8d25d1af63c631a819d7f83170ac6d15b49bd5017e38ada5df3ba6b"


def test_default_model_fingerprint_is_pinned():
    assert ModelDir(DEFAULT_MODEL).fingerprint == DEFAULT_FINGERPRINT


def test_bf16_model_written_by_torch_keeps_its_fingerprint_and_values(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    md = ModelDir(DEFAULT_MODEL)
    shutil.copy(DEFAULT_MODEL / "config.json", tmp_path)
    save_file(
        {n: torch.from_numpy(md.get(n)).to(torch.bfloat16) for n in md.tensor_names()},
        tmp_path / "model.safetensors",
        {"format": "pt"},
    )
    bf16 = ModelDir(tmp_path)
    assert bf16.fingerprint == DEFAULT_BF16_FINGERPRINT
    assert bf16.weight_dtype() == "BF16"
    np.testing.assert_array_equal(
        bf16.get("model.norm.weight")[:4], np.array([1.28125, 1.203125, 1.328125, 1.3984375], np.float32)
    )
    assert float(bf16.get("model.embed_tokens.weight").sum(dtype=np.float64)) == pytest.approx(
        103.10075849294662, abs=1e-9
    )


# the default model's tensors as ModelDir.get returns them, hashed (name, dtype, shape, float32 bytes):
# the value the hand-written reader gave
DEFAULT_VALUES_SHA256 = "19ab4d6389192ce6856172f75b2be6539fcd5ea43422e9ad6e7849c588110d11"


def test_default_model_values_are_those_the_old_reader_gave():
    md = ModelDir(DEFAULT_MODEL)
    digest = hashlib.sha256()
    for name in md.tensor_names():
        arr = md.get(name)
        digest.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
        np.testing.assert_array_equal(md.read_float32(name), arr)
    assert digest.hexdigest() == DEFAULT_VALUES_SHA256


def every_dtype() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f64": rng.normal(size=(3, 4)),
        "f32": rng.normal(size=(5,)).astype(np.float32),
        "f16": rng.normal(size=(3, 5)).astype(np.float16),  # 30 bytes: what follows may sit at an odd offset
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i32": np.arange(7, dtype=np.int32).reshape(7, 1),
        "i16": np.array([-2, 9], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float32),
    }


def test_reads_what_safetensors_numpy_save_file_wrote(tmp_path):
    from safetensors.numpy import save_file

    tensors = every_dtype()
    save_file(tensors, tmp_path / "np.safetensors", {"who": "numpy"})
    data = (tmp_path / "np.safetensors").read_bytes()
    for st in (
        SafetensorsFile(tmp_path / "np.safetensors"),
        SafetensorsFile(tmp_path / "np.safetensors", data=data),
    ):
        assert st.metadata == {"who": "numpy"}
        assert sorted(st.keys()) == sorted(tensors)
        whole = st.read_all()
        for name, arr in tensors.items():
            for got in (st.get(name), whole[name]):
                assert got.dtype == arr.dtype and got.shape == arr.shape and got.flags.aligned
                np.testing.assert_array_equal(got, arr)
        assert st.first_nonfinite() is None


def torch_tensors(torch):  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    return {
        "w_bf16": torch.randn(6, 8, generator=gen).to(torch.bfloat16),
        "w_f16": torch.randn(3, 3, generator=gen).to(torch.float16),
        "w_f32": torch.randn(4, generator=gen),
        "b_bf16": torch.randn(5, generator=gen).to(torch.bfloat16),
    }


def test_reads_what_torch_save_file_wrote_bf16_widened(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = torch_tensors(torch)
    save_file(tensors, tmp_path / "pt.safetensors", {"format": "pt"})
    data = (tmp_path / "pt.safetensors").read_bytes()
    for st in (
        SafetensorsFile(tmp_path / "pt.safetensors"),
        SafetensorsFile(tmp_path / "pt.safetensors", data=data),
    ):
        assert st.tensors["w_bf16"].dtype == "BF16" and st.tensors["w_bf16"].shape == (6, 8)
        whole = st.read_all()
        for name, t in tensors.items():
            want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            for got in (st.get(name), whole[name]):
                assert got.dtype == want.dtype and got.shape == want.shape
                np.testing.assert_array_equal(got, want)
        assert bytes(st.raw_bytes("w_bf16")) == tensors["w_bf16"].view(torch.int16).numpy().tobytes()
        assert st.first_nonfinite() is None


@pytest.mark.parametrize("where", ["w_bf16", "w_f16", "w_f32"])
def test_nan_is_found_in_torch_files(tmp_path, where):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = torch_tensors(torch)
    tensors[where].view(-1)[2] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    data = (tmp_path / "nan.safetensors").read_bytes()
    assert SafetensorsFile(tmp_path / "nan.safetensors").first_nonfinite() == where
    assert SafetensorsFile(tmp_path / "nan.safetensors", data=data).first_nonfinite() == where


def test_nan_in_an_adapter_is_refused(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    adapter = make_adapter(md.config, md.fingerprint, seed=2)
    module = sorted(adapter.modules)[0]
    adapter.modules[module].b[0, 0] = np.nan
    adapter.save(tmp_path / "nan.safetensors")
    data = (tmp_path / "nan.safetensors").read_bytes()
    for kwargs in ({}, {"data": data}):
        with pytest.raises(EdgeLoraError, match=f"{module}.lora_B.*NaN or Inf") as err:
            Adapter.load(tmp_path / "nan.safetensors", base=md.config, **kwargs)
        assert "\n" not in str(err.value) and str(tmp_path / "nan.safetensors") in str(err.value)


def with_gap(blob: bytes) -> bytes:
    """``blob`` with 4 unused bytes after its first tensor (the offsets after it moved to match)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header, body = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    cut = header[names[0]]["data_offsets"][1]
    for name in names[1:]:
        header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body[:cut] + bytes(4) + body[cut:]


def test_a_gap_between_tensors_is_refused_in_one_line(tmp_path):
    """The hand-written reader took gaps; the library refuses them, and so do we now."""
    blob = with_gap(serialize({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}))
    path = tmp_path / "gap.safetensors"
    path.write_bytes(blob)
    for data in (None, blob):
        with pytest.raises(EdgeLoraError, match="tensor 'b' overlaps another, leaves a gap") as err:
            SafetensorsFile(path, data=data)
        assert "\n" not in str(err.value) and str(path) in str(err.value) and "hint: " in str(err.value)


def test_bytes_in_hand_are_judged_as_the_file_would_be_without_memfd(tmp_path, monkeypatch):
    """Where there is no memfd (macOS), the stand-in for the library is a sparse temporary file."""
    good = serialize({"a": np.arange(4, dtype=np.float32)}, {"k": "v"})
    monkeypatch.delattr(os, "memfd_create", raising=False)
    st = SafetensorsFile(tmp_path / "named.safetensors", data=good)
    assert st.metadata == {"k": "v"}
    np.testing.assert_array_equal(st.read_all()["a"], np.arange(4, dtype=np.float32))
    with pytest.raises(EdgeLoraError, match="leaves a gap"):
        SafetensorsFile(
            tmp_path / "named.safetensors",
            data=with_gap(serialize({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)})),
        )
    assert not (tmp_path / "named.safetensors").exists()  # bytes in hand: the named file is never touched


def framed(head: bytes) -> bytes:
    return struct.pack("<Q", len(head)) + head


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "too short"),
        (struct.pack("<Q", 200_000_000) + b"{}", "header length exceeds"),
        (struct.pack("<Q", 40) + b"{}", "does not fit the file"),
        (struct.pack("<Q", 2) + b"[]", "not a valid safetensors header"),
        (struct.pack("<Q", 2) + b"{}" + bytes(4), "bytes after it"),
        (
            framed(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}') + bytes(4),
            "do not match its shape",
        ),
        (
            framed(b'{"x":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}}') + bytes(4),
            "unsupported",
        ),
    ],
)
def test_refusals_are_edge_lora_errors_naming_the_file(tmp_path, blob, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    for data in (None, blob):
        with pytest.raises(EdgeLoraError, match=message) as err:
            SafetensorsFile(path, data=data)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_written_files_are_the_librarys_and_strided_arrays_are_stored_right(tmp_path):
    from safetensors.numpy import load, load_file

    tensors = every_dtype()
    tensors["strided"] = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # not contiguous
    save_tensors(tmp_path / "ours.safetensors", tensors, {"k": "v"})
    for back in (load_file(tmp_path / "ours.safetensors"), load(serialize(tensors, {"k": "v"}))):
        assert sorted(back) == sorted(tensors)
        for name, arr in tensors.items():
            np.testing.assert_array_equal(back[name], arr)
    assert serialize(tensors, {"k": "v"}) == (tmp_path / "ours.safetensors").read_bytes()
    with pytest.raises(EdgeLoraError, match="cannot store tensor 'c'"):
        serialize({"c": np.zeros(2, np.complex64)})


def test_a_truncated_file_read_later_is_refused_not_crashed(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"a": np.ones((64, 64), np.float32)})
    st = SafetensorsFile(tmp_path / "t.safetensors")
    os.truncate(tmp_path / "t.safetensors", 200)
    for read in (lambda: st.get("a"), lambda: bytes(st.raw_bytes("a"))):
        with pytest.raises(EdgeLoraError) as err:
            read()
        assert "\n" not in str(err.value) and str(tmp_path / "t.safetensors") in str(err.value)


def test_fingerprint_streams_the_stored_bytes_of_a_multi_chunk_tensor(tmp_path):
    """A tensor larger than one read buffer: the fingerprint is sha256 over the bytes as stored."""
    shutil.copy(DEFAULT_MODEL / "config.json", tmp_path)
    big = np.random.default_rng(1).normal(size=(3, RAW_CHUNK // 4 + 5)).astype(np.float32)
    save_tensors(tmp_path / "model.safetensors", {"big": big, "small": np.ones(3, np.float16)})
    want = hashlib.sha256()
    want.update(f"big|F32|{list(big.shape)}\n".encode() + big.tobytes())
    want.update(b"small|F16|[3]\n" + np.ones(3, np.float16).tobytes())
    md = ModelDir(tmp_path)
    assert md.fingerprint == "sha256:" + want.hexdigest()


def test_read_float32_leaves_no_map_of_the_shard(tmp_path):
    shutil.copy(DEFAULT_MODEL / "config.json", tmp_path)
    save_tensors(tmp_path / "model.safetensors", {"w": np.ones((256, 256), np.float32)})
    md = ModelDir(tmp_path)
    arr = md.read_float32("w")
    assert (
        arr.dtype == np.float32 and arr.flags.writeable and arr.flags.c_contiguous and arr.sum() == 256 * 256
    )
    if Path("/proc/self/maps").exists():
        assert str(tmp_path / "model.safetensors") not in Path("/proc/self/maps").read_text()
