"""Adding an adapter reads each file once and checks the bytes it uses: bundle.json's hash and a trusted
key's signature judge exactly the bytes that are parsed (ONNX) or that llama.cpp loads (a private copy),
so a file changed on disk after it was read is never used, and nothing opens a file a second time."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from security_helpers import RegistryEngine

import runtime.engine as engine_module
from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir

IDS = [5, 6, 7, 8, 9]


@pytest.fixture()
def core(tmp_path, model_dirs):
    md = ModelDir(model_dirs["llama"])
    good, other = (
        random_adapter(md, seed=1),
        random_adapter(md, seed=9),
    )
    root = build_bundle(model_dirs["llama"], tmp_path / "bundle", {"sql": good}, backends=("gguf",))
    other.save(tmp_path / "other.safetensors")
    return root, good, tmp_path / "other.safetensors"


def _swap_file_during_parse(monkeypatch, target: Path, replacement: bytes) -> None:
    """The file on disk becomes ``replacement`` after it was read, before its bytes are parsed."""
    real = Adapter.load.__func__

    def load(cls, path, **kwargs):
        target.write_bytes(replacement)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(engine_module.Adapter, "load", classmethod(load))


def _same_weights(a: Adapter, b: Adapter) -> bool:
    return sorted(a.modules) == sorted(b.modules) and all(
        np.array_equal(a.modules[m].a, b.modules[m].a) and np.array_equal(a.modules[m].b, b.modules[m].b)
        for m in a.modules
    )


@pytest.mark.parametrize("verify_hashes", [True, False])
def test_file_replaced_after_the_read_is_never_used(core, monkeypatch, verify_hashes):
    """Another valid adapter written over the file between the check and the parse: the engine holds the
    bytes it read (and checked), never the new file."""
    root, good, other = core
    source = root / "adapters" / "sql.safetensors"
    _swap_file_during_parse(monkeypatch, source, other.read_bytes())
    engine = RegistryEngine(root, verify_hashes=verify_hashes)
    engine.add_adapter("sql")
    assert _same_weights(engine._adapters["sql"].adapter, good)
    assert not _same_weights(Adapter.load(source), good)  # the disk did change


def test_tampered_bytes_are_refused_even_if_the_file_is_restored_before_the_check(core, monkeypatch):
    root, _, _ = core
    source = root / "adapters" / "sql.safetensors"
    original = source.read_bytes()
    tampered = bytearray(original)
    tampered[-1] ^= 0x01
    source.write_bytes(bytes(tampered))
    _swap_file_during_parse(
        monkeypatch, source, original
    )  # the disk is good again when the digest is checked
    engine = RegistryEngine(root)
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        engine.add_adapter("sql")
    assert engine.adapters == []


def test_signature_judges_the_bytes_in_hand(core, monkeypatch, tmp_path, model_dirs):
    pytest.importorskip("cryptography")
    from edge_lora import signing

    root, _, other = core
    key, pub = signing.generate_keypair(tmp_path / "k")
    md = ModelDir(model_dirs["llama"])
    signed_adapter = random_adapter(md, seed=5)
    loose = tmp_path / "downloaded.safetensors"
    signed_adapter.save(loose)
    signing.sign_file(loose, key)
    _swap_file_during_parse(monkeypatch, loose, other.read_bytes())  # unsigned bytes on disk once read
    engine = RegistryEngine(root, trusted_keys=[pub])
    engine.add_adapter("dl", loose)
    assert _same_weights(engine._adapters["dl"].adapter, signed_adapter)


def test_a_fresh_add_opens_the_adapter_file_once_and_hashes_it_once(core, monkeypatch):
    root, _, _ = core
    opened, hashed = [], []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "sql.safetensors":
            opened.append(file)
        return real_open(file, *args, **kwargs)

    import edge_lora.file_hashes as bundle_module

    real_buffer = bundle_module._sha256_buffer
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(
        bundle_module, "_sha256_buffer", lambda data: hashed.append(len(data)) or real_buffer(data)
    )
    engine = RegistryEngine(root)
    engine.add_adapter("sql")
    assert len(opened) == 1 and hashed == [(root / "adapters" / "sql.safetensors").stat().st_size]


# --- the real backends --------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dirs):
    md = ModelDir(model_dirs["llama"])
    adapters = {"sql": random_adapter(md, seed=1), "tone": random_adapter(md, seed=2)}
    root = tmp_path_factory.mktemp("add_once")
    return build_bundle(md.path, root / "bundle", adapters, backends=("onnx", "gguf"))


@pytest.fixture(scope="module")
def reference(exported):
    """Each backend's logits with sql, from the intact bundle."""
    import runtime

    out = {}
    for backend in ("onnx", "llamacpp"):
        engine = runtime.load(
            exported, backend=backend, **({"precise": True} if backend == "llamacpp" else {})
        )
        engine.add_adapter("sql")
        out[backend] = engine.logits(IDS, adapters={"sql": 1.0})
    return out


def _copy(exported: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(exported, tmp_path / "bundle"))


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_backend_add_opens_each_file_once(exported, reference, backend, monkeypatch):
    """Python opens the .safetensors once; ONNX never opens the .onnx_adapter; llama.cpp loads the GGUF
    from the private copy the engine hashed, never from the bundle."""
    import runtime
    from runtime.llamacpp import model as llamacpp_model

    engine = runtime.load(exported, backend=backend, **({"precise": True} if backend == "llamacpp" else {}))
    opened, lora_paths = [], []
    real_open, real_load = builtins.open, llamacpp_model.Model.load_lora

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).parent.name == "adapters":
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(
        llamacpp_model.Model,
        "load_lora",
        lambda self, path: lora_paths.append(str(path)) or real_load(self, path),
    )
    engine.add_adapter("sql")
    expected = ["sql.safetensors"] + (["sql.gguf"] if backend == "llamacpp" else [])
    assert sorted(opened) == sorted(expected)
    assert all(p.startswith("/proc/self/fd/") for p in lora_paths) and len(lora_paths) == (
        backend == "llamacpp"
    )
    np.testing.assert_array_equal(engine.logits(IDS, adapters={"sql": 1.0}), reference[backend])


def test_onnx_never_reads_the_onnx_adapter(exported, reference, tmp_path):
    import runtime

    bundle = _copy(exported, tmp_path)
    (bundle / "adapters" / "sql.onnx_adapter").write_bytes(b"garbage")  # onnxruntime-genai's file, not ours
    engine = runtime.load(bundle, backend="onnx")
    engine.add_adapter("sql")
    np.testing.assert_array_equal(engine.logits(IDS, adapters={"sql": 1.0}), reference["onnx"])


def test_llamacpp_gguf_replaced_on_disk_while_loading_is_not_what_it_loads(
    exported, reference, tmp_path, monkeypatch
):
    """The bundle's GGUF is overwritten with another adapter's after the engine copied it: llama.cpp
    loads the checked copy, so the logits are sql's."""
    import runtime
    from runtime.llamacpp import model as llamacpp_model

    bundle = _copy(exported, tmp_path)
    gguf, other = bundle / "adapters" / "sql.gguf", (bundle / "adapters" / "tone.gguf").read_bytes()
    real_load = llamacpp_model.Model.load_lora

    def swap_then_load(self, path):
        gguf.write_bytes(other)
        return real_load(self, path)

    engine = runtime.load(bundle, backend="llamacpp", precise=True)
    monkeypatch.setattr(llamacpp_model.Model, "load_lora", swap_then_load)
    engine.add_adapter("sql")
    np.testing.assert_array_equal(engine.logits(IDS, adapters={"sql": 1.0}), reference["llamacpp"])
    engine.remove_adapter("sql")
    monkeypatch.setattr(llamacpp_model.Model, "load_lora", real_load)
    with pytest.raises(EdgeLoraError, match="sql.gguf.*does not match its SHA-256"):
        engine.add_adapter("sql")  # the disk now holds tone's GGUF: refused


def test_a_remembered_digest_stands_only_for_a_file_that_held_still_while_read(core, monkeypatch, tmp_path):
    """Re-adding skips the hash only when the file kept its identity during the read; a file changed
    meanwhile is hashed from the bytes in hand (here still the good ones, so the add succeeds)."""
    import time

    import edge_lora.file_hashes as bundle_module
    from edge_lora.bundle import FileHashes

    root, good, other = core
    monkeypatch.setattr(FileHashes, "SETTLE_NS", 0)
    engine = RegistryEngine(root)
    engine.add_adapter("sql")
    engine.remove_adapter("sql")
    hashed, real_read, real_sha = [], bundle_module._read_whole, bundle_module._sha256_buffer
    monkeypatch.setattr(bundle_module, "_sha256_buffer", lambda data: hashed.append(1) or real_sha(data))
    engine.add_adapter("sql")  # unchanged: the remembered digest stands, nothing is hashed
    engine.remove_adapter("sql")
    assert hashed == []
    source = root / "adapters" / "sql.safetensors"

    def read_then_change(f, size):
        data = real_read(f, size)
        time.sleep(0.05)  # a later ctime tick
        source.write_bytes(other.read_bytes())
        return data

    monkeypatch.setattr(bundle_module, "_read_whole", read_then_change)
    engine.add_adapter("sql")
    assert hashed == [1] and _same_weights(engine._adapters["sql"].adapter, good)
    assert not engine.bundle.hashes._known  # a file that moved while read is not remembered
