"""Ed25519 signing: keys, detached signatures, bundles, the CLI verbs and the runtime's trusted_keys."""

from __future__ import annotations

import json
import os
import stat

import pytest
from factories import build_bundle, random_adapter
from security_helpers import RegistryEngine

from edge_lora import signing
from edge_lora.app.cli import main as cli
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {
        "good": signing.generate_keypair(root / "good"),
        "other": signing.generate_keypair(root / "other"),
    }


@pytest.fixture()
def bundle(tmp_path, model_dirs):
    """The smallest real bundle: a GGUF f32 base and two adapters."""
    md = ModelDir(model_dirs["llama"])
    adapters = {"sql": random_adapter(md, seed=1), "tone": random_adapter(md, seed=2)}
    return build_bundle(md.path, tmp_path / "bundle", adapters, backends=("gguf",))


def flip_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_keygen_writes_private_key_owner_only_and_refuses_to_overwrite(tmp_path):
    key, pub = signing.generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(EdgeLoraError, match="overwrite"):
        signing.generate_keypair(tmp_path / "k")


def test_public_key_formats_agree(keys, tmp_path):
    pem = signing.load_public_key(keys["good"][1])
    (tmp_path / "raw.pub").write_bytes(pem.raw)
    (tmp_path / "hex.pub").write_text(pem.raw.hex() + "\n")
    assert (
        signing.load_public_key(tmp_path / "raw.pub") == pem == signing.load_public_key(tmp_path / "hex.pub")
    )
    assert signing.load_public_key(pem.raw) == pem and len(pem.key_id) == 16
    assert signing.load_trusted_keys(pem) == signing.load_trusted_keys([keys["good"][1]]) == {pem.key_id: pem}
    with pytest.raises(EdgeLoraError, match="not an Ed25519 public key"):
        (tmp_path / "bad.pub").write_text("hello")
        signing.load_public_key(tmp_path / "bad.pub")
    with pytest.raises(EdgeLoraError, match="private key"):
        signing.load_private_key(keys["good"][1])


def test_file_signature_round_trip_and_every_tampering(keys, bundle):
    target = bundle / "adapters" / "sql.safetensors"
    sig = signing.sign_file(target, keys["good"][0])
    assert signing.verify_file(target, [keys["good"][1]]) == signing.load_public_key(keys["good"][1]).key_id
    with pytest.raises(EdgeLoraError, match="not a trusted key"):
        signing.verify_file(target, [keys["other"][1]])

    record = json.loads(sig.read_text())
    forged = signing.load_private_key(keys["other"][0]).sign(signing.DOMAIN + bytes.fromhex(record["sha256"]))
    import base64

    sig.write_text(
        json.dumps({**record, "signature": base64.b64encode(forged).decode()})
    )  # right key id, wrong signer
    with pytest.raises(EdgeLoraError, match="signature is invalid"):
        signing.verify_file(target, [keys["good"][1]])

    signing.sign_file(target, keys["good"][0])
    flip_byte(target)
    with pytest.raises(EdgeLoraError, match="modified after signing"):
        signing.verify_file(target, [keys["good"][1]])

    sig.write_text("{not json")
    with pytest.raises(EdgeLoraError, match="not valid JSON"):
        signing.verify_file(target, [keys["good"][1]])
    sig.unlink()
    with pytest.raises(EdgeLoraError, match="no signature"):
        signing.verify_file(target, [keys["good"][1]])


def test_bundle_signature_covers_every_file(keys, bundle):
    signing.sign_bundle(bundle, keys["good"][0])
    files = Bundle.open(bundle).files
    assert "tokenizer.json" in files and "adapters/sql.safetensors" in files
    assert signing.verify_bundle(bundle, [keys["good"][1]])["files"] == len(files)
    flip_byte(bundle / "tokenizer.json", 10)
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        signing.verify_bundle(bundle, [keys["good"][1]])


def test_editing_bundle_json_breaks_its_signature(keys, bundle):
    signing.sign_bundle(bundle, keys["good"][0])
    manifest = bundle / "bundle.json"
    manifest.write_text(manifest.read_text().replace('"scale": 1.0', '"scale": 2.0', 1))
    with pytest.raises(EdgeLoraError, match="modified after signing"):
        signing.verify_bundle(bundle, [keys["good"][1]])
    with pytest.raises(EdgeLoraError, match="modified after signing"):
        RegistryEngine(bundle, trusted_keys=[keys["good"][1]])


def test_runtime_without_trusted_keys_loads_unsigned_adapters(bundle):
    engine = RegistryEngine(bundle)
    engine.add_adapter("sql")
    assert engine.adapters == ["sql"]


def test_runtime_refuses_unsigned_adapters(keys, bundle):
    engine = RegistryEngine(bundle, trusted_keys=[keys["good"][1]])
    with pytest.raises(EdgeLoraError, match="no signature"):
        engine.add_adapter("sql")
    with pytest.raises(EdgeLoraError, match="no signature"):
        RegistryEngine(bundle, trusted_keys=[]).add_adapter("tone")
    assert engine.adapters == []


def test_runtime_accepts_signed_bundle_and_refuses_tampered_adapter(keys, bundle):
    signing.sign_bundle(bundle, keys["good"][0])
    engine = RegistryEngine(bundle, trusted_keys=[keys["good"][1]], verify_hashes=False)
    engine.add_adapter("sql")
    flip_byte(bundle / "adapters" / "tone.safetensors")
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        engine.add_adapter("tone")  # checked although verify_hashes=False: trust overrides it
    with pytest.raises(EdgeLoraError, match="not a trusted key"):
        RegistryEngine(bundle, trusted_keys=[keys["other"][1]])
    assert engine.adapters == ["sql"]


def test_runtime_adapter_file_from_elsewhere_needs_its_own_signature(keys, bundle, tmp_path, model_dirs):
    md = ModelDir(model_dirs["llama"])
    outside = tmp_path / "downloaded.safetensors"
    random_adapter(md, seed=5).save(outside)
    signing.sign_bundle(bundle, keys["good"][0])
    engine = RegistryEngine(bundle, trusted_keys=[keys["good"][1]])
    with pytest.raises(EdgeLoraError, match="no signature"):
        engine.add_adapter("dl", outside)
    signing.sign_file(outside, keys["other"][0])
    with pytest.raises(EdgeLoraError, match="not a trusted key"):
        engine.add_adapter("dl", outside)
    signing.sign_file(outside, keys["good"][0])
    engine.add_adapter("dl", outside)
    assert engine.adapters == ["dl"]


def test_runtime_load_forwards_trusted_keys(keys, bundle):
    """runtime.load hands trusted_keys to the engine: unsigned adapters and other keys are refused."""
    import runtime

    engine = runtime.load(bundle, trusted_keys=[keys["good"][1]])  # unsigned bundle
    with pytest.raises(EdgeLoraError, match="no signature"):
        engine.add_adapter("sql")
    assert engine.adapters == []
    signing.sign_bundle(bundle, keys["good"][0])
    with pytest.raises(EdgeLoraError, match="not a trusted key"):
        runtime.load(bundle, trusted_keys=[keys["other"][1]])
    engine = runtime.load(bundle, trusted_keys=[keys["good"][1]])
    engine.add_adapter("sql")
    assert engine.adapters == ["sql"]


def test_cli_keygen_sign_verify(tmp_path, bundle, capsys):
    prefix = tmp_path / "release"
    assert cli(["keygen", str(prefix)]) == 0
    assert cli(["sign", "--key", f"{prefix}.key", str(bundle)]) == 0
    assert (
        cli(["verify", "--key", f"{prefix}.pub", str(bundle), str(bundle / "adapters" / "sql.safetensors")])
        == 0
    )
    assert cli(["verify", str(bundle)]) == 0
    flip_byte(bundle / "adapters" / "sql.safetensors")
    capsys.readouterr()
    assert cli(["verify", "--key", f"{prefix}.pub", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sql.safetensors" in err and "Traceback" not in err
    assert Bundle.open(bundle).adapters["sql"]["source"] == "adapters/sql.safetensors"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dirs, keys):
    md = ModelDir(model_dirs["llama"])
    adapters = {"sql": random_adapter(md, seed=1), "tone": random_adapter(md, seed=2)}
    root = tmp_path_factory.mktemp("signed_export")
    bundle = build_bundle(md.path, root / "bundle", adapters, backends=("onnx", "gguf"))
    signing.sign_bundle(bundle, keys["good"][0])
    return bundle


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_real_backends_honour_trusted_keys(exported, keys, backend, tmp_path):
    import shutil

    import runtime

    engine = runtime.load(exported, backend=backend, trusted_keys=[keys["good"][1]])
    engine.add_adapter("sql")
    signed_out = engine.generate_ids(
        [5, 6, 7], runtime.SamplingParams.from_kwargs(max_new_tokens=4), adapters={"sql": 1.0}
    )
    assert len(signed_out) == 4
    with pytest.raises(EdgeLoraError, match="not a trusted key"):
        runtime.load(exported, backend=backend, trusted_keys=[keys["other"][1]])

    tampered = shutil.copytree(exported, tmp_path / "tampered")
    twin = Bundle.open(tampered).adapters["tone"]["gguf" if backend == "llamacpp" else "source"]
    flip_byte(tampered / twin, -5)
    engine = runtime.load(tampered, backend=backend, trusted_keys=[keys["good"][1]])
    with pytest.raises(EdgeLoraError, match="does not match its SHA-256"):
        engine.add_adapter("tone")
    assert engine.adapters == []
