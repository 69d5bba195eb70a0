"""Adding an adapter fast without giving up a check: remembered hashes that notice every change,
the one-read safetensors path, the raw-bit finiteness scan, the GGUF adapter writer and llama.cpp's
scratch conversion."""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from security_helpers import RegistryEngine

from edge_lora import file_hashes as bundle_module
from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle, FileHashes
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.safetensors_file import SafetensorsFile, save_tensors

TICK = 0.05  # longer than a coarse file-time tick (1-10 ms): a later change gets a later ctime


@pytest.fixture()
def core_bundle(tmp_path, model_dirs):
    md = ModelDir(model_dirs["llama"])
    return build_bundle(md.path, tmp_path / "bundle", {"sql": random_adapter(md, seed=1)}, backends=("gguf",))


@pytest.fixture()
def hash_reads(monkeypatch):
    """How many times a file's bytes were hashed (the remembered digests skip this)."""
    count = {"n": 0}
    for name in ("_sha256_open", "_sha256_buffer"):  # a file on its way in, or bytes already read
        real = getattr(bundle_module, name)

        def counting(f, *args, real=real):
            count["n"] += 1
            return real(f, *args)

        monkeypatch.setattr(bundle_module, name, counting)
    return count


@pytest.fixture()
def settled(monkeypatch):
    """Files count as settled at once (the real rule wants their last change 2 s in the past)."""
    monkeypatch.setattr(FileHashes, "SETTLE_NS", 0)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# --- remembered hashes -------------------------------------------------------------------


def test_readding_an_unchanged_adapter_does_not_hash_it_again(core_bundle, hash_reads, settled):
    engine = RegistryEngine(core_bundle)
    engine.add_adapter("sql")
    engine.remove_adapter("sql")
    engine.add_adapter("sql")
    assert hash_reads["n"] == 1


def test_adapter_changed_in_place_after_its_hash_was_remembered_is_refused(core_bundle, hash_reads, settled):
    engine = RegistryEngine(core_bundle)
    engine.add_adapter("sql")
    engine.remove_adapter("sql")
    time.sleep(TICK)
    _flip_last_byte(core_bundle / "adapters" / "sql.safetensors")
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        engine.add_adapter("sql")
    assert hash_reads["n"] == 2


def test_same_size_rewrite_with_its_old_mtime_is_still_noticed(core_bundle, settled):
    path = core_bundle / "adapters" / "sql.safetensors"
    engine = RegistryEngine(core_bundle)
    engine.add_adapter("sql")
    engine.remove_adapter("sql")
    before = path.stat()
    time.sleep(TICK)
    _flip_last_byte(path)
    os.utime(
        path, ns=(before.st_atime_ns, before.st_mtime_ns)
    )  # hides the change from mtime; ctime still moves
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        engine.add_adapter("sql")


def test_adapter_replaced_by_a_rename_is_noticed(core_bundle, settled):
    path = core_bundle / "adapters" / "sql.safetensors"
    engine = RegistryEngine(core_bundle)
    engine.add_adapter("sql")
    engine.remove_adapter("sql")
    forged = path.with_name("forged")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    forged.write_bytes(bytes(data))
    stat = path.stat()
    os.utime(forged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(forged, path)
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        engine.add_adapter("sql")


def test_recently_changed_file_is_hashed_every_time(core_bundle, hash_reads):
    """A file changed within SETTLE_NS could change again inside the same time tick unseen: never
    remembered."""
    bundle = Bundle.open(core_bundle)
    path = core_bundle / "adapters" / "sql.safetensors"
    _flip_last_byte(path)
    _flip_last_byte(path)  # back to the recorded bytes, just now
    bundle.verify_file("adapters/sql.safetensors")
    _flip_last_byte(path)  # no sleep: may share the tick of the previous write
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        bundle.verify_file("adapters/sql.safetensors")
    assert hash_reads["n"] == 2


def test_file_changing_while_hashed_is_not_remembered(tmp_path, settled, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    hashes = FileHashes()
    real = bundle_module._sha256_open

    def write_meanwhile(f, *args):
        digest = real(f, *args)
        time.sleep(TICK)
        path.write_bytes(b"y" * 4096)
        return digest

    monkeypatch.setattr(bundle_module, "_sha256_open", write_meanwhile)
    hashes.sha256(path)
    assert not hashes._known


def test_signed_foreign_adapter_is_rechecked_after_a_change(
    core_bundle, tmp_path, model_dirs, settled, hash_reads
):
    pytest.importorskip("cryptography")
    from edge_lora import signing

    key, pub = signing.generate_keypair(tmp_path / "k")
    md = ModelDir(model_dirs["llama"])
    outside = tmp_path / "downloaded.safetensors"
    random_adapter(md, seed=5).save(outside)
    signing.sign_file(outside, key)
    engine = RegistryEngine(core_bundle, trusted_keys=[pub])
    signed = hash_reads["n"]
    engine.add_adapter("dl", outside)
    engine.remove_adapter("dl")
    engine.add_adapter("dl", outside)
    assert hash_reads["n"] == signed + 1
    engine.remove_adapter("dl")
    time.sleep(TICK)
    _flip_last_byte(outside)
    with pytest.raises(EdgeLoraError, match="modified after signing"):
        engine.add_adapter("dl", outside)


# --- one read, raw-bit scan ------------------------------------------------------------


def test_read_all_equals_tensor_by_tensor(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(np.float16),  # 30 bytes: the next tensor sits at an odd offset
        "b": rng.normal(size=(4, 2)).astype(np.float32),
        "c": np.zeros((0, 7), np.float32),
        "d": np.arange(6, dtype=np.int64),
    }
    save_tensors(tmp_path / "t.safetensors", tensors)
    st = SafetensorsFile(tmp_path / "t.safetensors")
    whole = st.read_all()
    for name, arr in tensors.items():
        assert whole[name].dtype == arr.dtype and whole[name].shape == arr.shape and whole[name].flags.aligned
        np.testing.assert_array_equal(whole[name], st.get(name))
    assert st.first_nonfinite() is None


def test_read_all_refuses_a_file_changed_since_its_header(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"a": np.ones((64, 64), np.float32)})
    st = SafetensorsFile(tmp_path / "t.safetensors")
    with open(tmp_path / "t.safetensors", "r+b") as f:
        f.truncate(200)
    with pytest.raises(EdgeLoraError, match="changed while"):
        st.read_all()
    save_tensors(tmp_path / "t.safetensors", {"a": np.ones((64, 64), np.float32)})  # atomic: a new inode
    st = SafetensorsFile(tmp_path / "t.safetensors")
    save_tensors(tmp_path / "t.safetensors", {"a": np.zeros((64, 64), np.float32)})
    with pytest.raises(EdgeLoraError, match="changed while"):
        st.read_all()


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_nonfinite_value_is_found_in_a_run(tmp_path, dtype, bad):
    values = np.linspace(-60000, 60000, 4000, dtype=np.float32)  # large but finite in every dtype
    tensors = {f"t{i}": values.reshape(40, 100).copy() for i in range(5)}
    tensors["t3"][7, 11] = bad
    raw = {}
    for name, arr in tensors.items():
        if dtype == "F16":
            raw[name] = arr.astype(np.float16)
        elif dtype == "BF16":
            raw[name] = (arr.view(np.uint32) >> 16).astype(np.uint16)
        else:
            raw[name] = arr
    blob = _safetensors_bytes(raw, dtype)
    (tmp_path / "t.safetensors").write_bytes(blob)
    st = SafetensorsFile(tmp_path / "t.safetensors")
    st.read_all()
    assert st.first_nonfinite() == "t3"


def _safetensors_bytes(tensors: dict[str, np.ndarray], dtype: str) -> bytes:
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        data = arr.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def test_f16_adapter_stays_f16_and_refuses_inf(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    adapter = random_adapter(md, seed=3)
    adapter.save(tmp_path / "h.safetensors", dtype=np.float16)
    back = Adapter.load(tmp_path / "h.safetensors", base=md.config, base_fingerprint=md.fingerprint)
    module = next(iter(adapter.modules))
    assert back.modules[module].a.dtype == np.float16
    np.testing.assert_allclose(back.delta(module), adapter.delta(module), rtol=2e-2, atol=2e-3)
    st = SafetensorsFile(tmp_path / "h.safetensors")
    tensors = st.read_all()
    tensors[f"{module}.lora_B"] = tensors[f"{module}.lora_B"].copy()
    tensors[f"{module}.lora_B"][0, 0] = np.inf
    save_tensors(tmp_path / "bad.safetensors", tensors, st.metadata)
    with pytest.raises(EdgeLoraError, match=f"{module}.lora_B.*NaN or Inf"):
        Adapter.load(tmp_path / "bad.safetensors", base=md.config)


# --- the GGUF adapter writer -----------------------------------------------------------


def test_gguf_adapter_carries_llama_cpps_adapter_keys(model_dirs, tmp_path):
    """The keys llama.cpp's convert_lora_to_gguf.py writes, alpha as float32 (float64 aborts llama.cpp)."""
    import gguf

    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
    from edge_lora.gguf_format.names import FINGERPRINT_KEY, gguf_arch

    md = ModelDir(model_dirs["llama"])
    adapter = random_adapter(md, seed=4, std=0.3)
    fields = gguf.GGUFReader(export_gguf_adapter(adapter, md.config, tmp_path / "a.gguf")).fields
    assert fields[gguf.Keys.General.ARCHITECTURE].contents() == gguf_arch(md.config)
    assert fields[gguf.Keys.General.TYPE].contents() == gguf.GGUFType.ADAPTER
    assert fields[gguf.Keys.Adapter.TYPE].contents() == "lora"
    alpha = fields[gguf.Keys.Adapter.LORA_ALPHA]
    assert alpha.types == [gguf.GGUFValueType.FLOAT32] and alpha.contents() == pytest.approx(8.0)
    assert fields[FINGERPRINT_KEY].contents() == md.fingerprint


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_adapter_matches_gguf_writer(model_dirs, tmp_path, dtype):
    """Our adapter writer against gguf-py's GGUFWriter used as llama.cpp's converter uses it: the same file,
    byte for byte."""
    import gguf

    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter, gguf_lora_tensors
    from edge_lora.gguf_format.names import FINGERPRINT_KEY, gguf_arch
    from edge_lora.gguf_format.quant import encode

    md = ModelDir(model_dirs["llama"])
    adapter = random_adapter(md, seed=4, std=0.3, mixed_ranks=2)
    ours = export_gguf_adapter(adapter, md.config, tmp_path / "ours.gguf", dtype)
    alpha, tensors = gguf_lora_tensors(adapter, md.config)
    writer = gguf.GGUFWriter(os.fspath(tmp_path / "ref.gguf"), gguf_arch(md.config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(FINGERPRINT_KEY, adapter.base_fingerprint)
    for base_name, (a, b) in tensors.items():
        for suffix, arr in (("lora_a", a), ("lora_b", b)):
            T = gguf.GGMLQuantizationType
            qtype = (
                T.F32 if dtype == "f32" else T.Q8_0 if dtype == "q8_0" and arr.shape[-1] % 32 == 0 else T.F16
            )
            writer.add_tensor(f"{base_name}.{suffix}", encode(arr, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert ours.read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_rewriting_a_longer_gguf_in_place_leaves_no_tail(model_dirs, tmp_path):
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter

    md = ModelDir(model_dirs["llama"])
    scratch = tmp_path / "scratch.gguf"
    export_gguf_adapter(random_adapter(md, seed=1, rank=8, std=0.3), md.config, scratch, durable=False)
    small = random_adapter(md, seed=2, rank=2, std=0.3)
    export_gguf_adapter(small, md.config, scratch, durable=False)
    export_gguf_adapter(small, md.config, tmp_path / "fresh.gguf")
    assert scratch.read_bytes() == (tmp_path / "fresh.gguf").read_bytes()


# --- llama.cpp: the scratch conversion and swaps ----------------------------------------


def test_llamacpp_foreign_adapters_share_one_scratch_file_and_survive_a_merge(model_dirs, tmp_path):
    pytest.importorskip("llama_cpp")
    import runtime

    md = ModelDir(model_dirs["llama"])
    a, b = (
        random_adapter(md, seed=1, rank=8, std=0.3),
        random_adapter(md, seed=2, rank=2, std=0.3, mixed_ranks=2),
    )
    bundle = build_bundle(md.path, tmp_path / "b", {"a": a, "b": b}, backends=("gguf",))
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    ids = list(range(3, 15))
    reference = runtime.load(bundle, backend="llamacpp", precise=True)
    reference.add_adapter("a")
    reference.add_adapter("b")
    engine = runtime.load(bundle, backend="llamacpp", precise=True)
    engine.add_adapter(
        "fa", tmp_path / "a.safetensors"
    )  # the larger one first: the smaller rewrites its file
    engine.add_adapter("fb", tmp_path / "b.safetensors")
    assert [p.name for p in engine._scratch.parent.iterdir()] == ["converted.gguf"]
    for theirs, ours in (("a", "fa"), ("b", "fb")):
        np.testing.assert_array_equal(
            engine.logits(ids, adapters={ours: 1.0}), reference.logits(ids, adapters={theirs: 1.0})
        )
    engine.merge("fa", 0.5)  # reloads the converted adapters on the merged model
    reference.merge("a", 0.5)
    np.testing.assert_array_equal(
        engine.logits(ids, adapters={"fb": 1.0}), reference.logits(ids, adapters={"b": 1.0})
    )


@pytest.mark.parametrize("precise", [True, False])  # plain softmax / flash attention
def test_llamacpp_swaps_equal_fresh_contexts_without_zeroing_the_cache(model_dirs, tmp_path, precise):
    """Swaps forget the cache without zeroing it; alternating sets must still give a fresh context's
    logits."""
    pytest.importorskip("llama_cpp")
    import runtime

    md = ModelDir(model_dirs["llama"])
    adapters = {"a": random_adapter(md, seed=1, std=0.3), "b": random_adapter(md, seed=2, std=0.3)}
    bundle = build_bundle(md.path, tmp_path / "b", adapters, backends=("gguf",))
    long, short = list(range(3, 40)), [5, 6, 7]
    engine = runtime.load(bundle, backend="llamacpp", precise=precise)
    engine.add_adapter("a")
    engine.add_adapter("b")
    engine.logits(long, adapters={"a": 1.0})  # fills cells that the short requests' attention must ignore
    swapped = [engine.logits(short, adapters=s) for s in ({"b": 1.0}, {"a": 1.0}, {})]
    for s, got in zip(({"b": 1.0}, {"a": 1.0}, {}), swapped):
        fresh = runtime.load(bundle, backend="llamacpp", precise=precise)
        for name in s:
            fresh.add_adapter(name)
        np.testing.assert_array_equal(fresh.logits(short, adapters=s), got)
