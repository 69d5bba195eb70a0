"""The C library (native/, include/edge_lora.h) against the Python runtime on the same bundles: the
same greedy tokens and logits (base, one adapter, stacked, swapped, new tokens, activated adapters, q8_0),
the same one-line refusals of bad bundles, adapters and signatures; its own C test program and fuzz
driver."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from native_build import ROOT, build

from edge_lora.bundle import Bundle
from edge_lora.model_dir import ModelDir
from runtime.sampling import SamplingParams

PROMPT = [5, 17, 42, 99, 120, 7, 33]
SETS = [{}, {"a": 1.0}, {"b": 1.0}, {"a": 1.0, "b": 0.5}, {"a": 1.0}, {"tok": 1.0}, {"a": 0.7, "tok": 1.0}]
INVOKE_X = [11, 12, 13]  # activated adapters' (aLoRA) invocation tokens
INVOKE_Y = [21, 22]
ALL = ("a", "b", "tok", "x", "y")


@pytest.fixture(scope="module")
def native_dir():
    return build()


@pytest.fixture(scope="module")
def lib(native_dir):
    from runtime.native import NativeLibrary

    return NativeLibrary(native_dir / "libedge_lora.so")


def _with_new_tokens(md: ModelDir, seed: int = 3):
    rng = np.random.default_rng(seed)
    adapter = random_adapter(md, seed=seed, rank=2, std=0.3)
    adapter.added_tokens = ["<sql>", "</sql>"]
    adapter.embed_rows = rng.normal(0, 1.0, (2, md.config.hidden_size)).astype(np.float32)
    if not md.config.tie_word_embeddings:
        adapter.head_rows = rng.normal(0, 1.0, (2, md.config.hidden_size)).astype(np.float32)
    return adapter


def _activated(adapter, invocation):
    adapter.invocation_tokens = list(invocation)
    return adapter


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    adapters = {
        "a": random_adapter(md, seed=1, std=0.3),
        "b": random_adapter(md, seed=2, rank=8, rslora=True, std=0.3),
        "tok": _with_new_tokens(md),
        "x": _activated(random_adapter(md, seed=11, std=0.2), INVOKE_X),
        "y": _activated(random_adapter(md, seed=12, rank=2, std=0.4), INVOKE_Y),
    }
    root = tmp_path_factory.mktemp("native") / "b"
    return build_bundle(md.path, root, adapters, backends=("gguf",), gguf_quants=("f32", "q8_0"))


def _python_engine(bundle, quant, names, **options):
    import runtime

    engine = runtime.load(bundle, backend="llamacpp", quant=quant, precise=True, threads=2, **options)
    for name in names:
        engine.add_adapter(name)
    return engine


def _python(bundle, quant="f32", **options):
    return _python_engine(bundle, quant, ("a", "b", "tok"), **options)


def _native(lib, bundle, quant="f32", names=("a", "b", "tok"), **options):
    engine = lib.open(bundle, quant=quant, precise=True, threads=2, **options)
    for name in names:
        engine.add_adapter(name)
    return engine


def test_c_test_program(native_dir, bundle):
    program = native_dir / "test_edge_lora"
    argv = [str(program), str(bundle), "a", "b", "x"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_fuzz_driver_on_the_parsers(native_dir):
    done = subprocess.run(
        [str(native_dir / "fuzz_parsers"), str(ROOT / "native" / "fuzz" / "corpus"), "20000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_same_greedy_tokens_and_logits_as_python(lib, bundle, quant):
    python = _python(bundle, quant)
    greedy = SamplingParams(max_new_tokens=12)
    with _native(lib, bundle, quant) as native:
        for adapters in SETS:  # in this order: every switch of set, and back
            prompt = PROMPT + [python.config.vocab_size] if "tok" in adapters else PROMPT  # a new token in it
            expected = python.generate_ids(prompt, greedy, adapters=adapters)
            assert native.generate(prompt, adapters, max_new_tokens=12) == expected, adapters
            want = python.logits(prompt, adapters=adapters)
            got = native.logits(prompt, adapters)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=str(adapters))
    python.close()


# --- activated adapters (aLoRA) ---------------------------------------------------------------


def _prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(30, 300, n)]  # no invocation token by chance


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_activated_adapters_same_tokens_and_logits_as_python(lib, bundle, quant):
    """Requests taking turns on one system prompt: an activated adapter alone, stacked with an ordinary
    one, two in one set, prompts without the invocation; each position evaluated under the adapters
    acting there (runtime/activation.py), the cache of the base prefix shared."""
    python = _python_engine(bundle, quant, ALL)
    system, new = _prompt(3, 60), python.config.vocab_size
    turns = [
        ({"x": 1.0}, system + [40, 41] + INVOKE_X),
        ({"y": 1.0}, system + [40, 41] + INVOKE_Y),
        ({}, system + [42]),
        ({"x": 1.0, "a": 0.5}, system + [43] + INVOKE_X + [44]),  # stacked with an ordinary adapter
        ({"x": 1.0, "y": 0.8}, system + INVOKE_Y + [45] + INVOKE_X),  # two activated: three segments
        ({"x": 1.0}, system + INVOKE_X + [46] + INVOKE_X + [47]),  # the last occurrence counts
        ({"y": 1.0}, system + [48]),  # no invocation: the base everywhere
        ({"x": 1.0, "b": 1.0}, system + [49] + INVOKE_Y),  # no invocation of x: b alone
        ({"x": 0.5, "tok": 1.0}, system + [new] + INVOKE_X),  # an ordinary adapter's new token before it
        ({"y": 1.0}, system + [40, 41] + INVOKE_Y + [46]),
    ]
    greedy = SamplingParams(max_new_tokens=8)
    with _native(lib, bundle, quant, names=ALL) as native:
        for adapters, prompt in turns:
            want = python.generate_ids(prompt, greedy, adapters=adapters)
            assert native.generate(prompt, adapters, max_new_tokens=8) == want, (adapters, prompt[60:])
            want = python.logits(prompt, adapters=adapters)
            got = native.logits(prompt, adapters)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=str((adapters, prompt[60:])))
        # x acts from its invocation on and not before it
        prompt = system + [40] + INVOKE_X + [41]
        got, base = native.logits(prompt, {"x": 1.0}), native.logits(prompt, {})
        start = len(system) + 1
        np.testing.assert_allclose(got[:start], base[:start], atol=1e-5, rtol=0)
        assert np.abs(got[start:] - base[start:]).max() > 0.05
    python.close()


def test_activated_adapters_reuse_the_base_prefix(lib, bundle, model_dirs, tmp_path):
    """x, then y, then the base on one system prompt: each later request evaluates only what follows the
    system prompt, in the library as in the Python engine (info()['evaluated_positions'])."""
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
    from runtime.native import NativeError

    python = _python_engine(bundle, "f32", ("x", "y"))
    system = _prompt(4, 150)
    turns = [({"x": 1.0}, system + INVOKE_X), ({"y": 1.0}, system + INVOKE_Y), ({}, system + [42])]
    greedy = SamplingParams(max_new_tokens=3)
    with _native(lib, bundle, names=("x", "y", "a")) as native:
        assert native.invocation("x") == INVOKE_X and native.invocation("y") == INVOKE_Y
        assert native.invocation("a") == []
        with pytest.raises(NativeError, match="no adapter 'nope' is loaded"):
            native.invocation("nope")
        for i, (adapters, prompt) in enumerate(turns):
            before, python_before = native.evaluated_positions, python.info()["evaluated_positions"]
            out = native.generate(prompt, adapters, max_new_tokens=3)
            assert out == python.generate_ids(prompt, greedy, adapters=adapters), adapters
            fresh = len(prompt) - (len(system) if i else 0)
            assert python.info()["evaluated_positions"] - python_before == fresh + len(out)
            # the library does not evaluate the last token when max_new_tokens ends the request
            assert native.evaluated_positions - before == fresh + len(out) - (len(out) == 3), adapters
        # by path: llama.cpp reads the invocation from the GGUF (adapter.alora.invocation_tokens)
        md = ModelDir(model_dirs["llama"])
        activated = _activated(random_adapter(md, seed=11, std=0.2), INVOKE_X)
        native.add_adapter("xp", export_gguf_adapter(activated, md.config, tmp_path / "xp.gguf"))
        assert native.invocation("xp") == INVOKE_X
        for prompt in (system + INVOKE_X + [50], system + [50]):
            want = native.generate(prompt, {"x": 1.0}, max_new_tokens=6)
            assert native.generate(prompt, {"xp": 1.0}, max_new_tokens=6) == want
    python.close()


def _with_metadata(path: Path, out: Path, edit: tuple[str, str] = ("", ""), **changes) -> None:
    """An adapter file with keys of its edge_lora metadata changed (the tensors as they were); ``edit``
    replaces a text in the metadata's JSON (a number written as ``5e0``, which json.dumps never writes)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["edge_lora"])
    text = json.dumps({**meta, **changes})
    header["__metadata__"]["edge_lora"] = text.replace(*edit) if edit[0] else text
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def test_bad_activated_adapters_refused_with_the_same_message(lib, bundle_copy, model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    source = bundle_copy / "adapters" / "x.safetensors"
    original = tmp_path / "x.safetensors"
    original.write_bytes(source.read_bytes())
    key = "alora_invocation_tokens"
    # cJSON reads 3.0 and 5e0 as the number 3 and 5; Python's json as floats, refused as ids
    for bad in ("hi", [], [-1], [1.5], [3.0], [2, 10.0], [True], {"0": 1}):
        _with_metadata(original, source, **{key: bad})
        assert "is not a non-empty list of token ids" in _same_refusal(
            lib, bundle_copy, "x", verify_hashes=False
        )
    _with_metadata(original, source, edit=("[4, 5]", "[4, 5e0]"), **{key: [4, 5]})
    assert "is not a non-empty list of token ids" in _same_refusal(lib, bundle_copy, "x", verify_hashes=False)
    _with_metadata(original, source, replaced_tokens=[3.0])
    assert "is not a list of distinct token ids" in _same_refusal(lib, bundle_copy, "x", verify_hashes=False)
    _with_metadata(original, source, edit=("[3]", "[3E0]"), replaced_tokens=[3])
    assert "is not a list of distinct token ids" in _same_refusal(lib, bundle_copy, "x", verify_hashes=False)
    _with_metadata(original, source, **{key: [5, md.config.vocab_size + 7]})
    assert "are past the base vocabulary" in _same_refusal(lib, bundle_copy, "x", verify_hashes=False)
    _activated(random_adapter(md, seed=5, dora=True), INVOKE_X).save(source)
    assert "cannot be DoRA" in _same_refusal(lib, bundle_copy, "x", verify_hashes=False)
    _activated(_with_new_tokens(md), INVOKE_X).save(source)
    assert "cannot add or replace tokens" in _same_refusal(lib, bundle_copy, "x", verify_hashes=False)


# --- the same refusals ------------------------------------------------------------------------


def _python_error(call, *args, **kwargs) -> str:
    from edge_lora.errors import EdgeLoraError

    try:
        call(*args, **kwargs)
    except EdgeLoraError as err:
        return str(err)
    return "accepted"


def _native_error(call, *args, **kwargs) -> str:
    from runtime.native import NativeError

    try:
        call(*args, **kwargs)
    except NativeError as err:
        assert "\n" not in str(err)
        return str(err)
    return "accepted"


def _native_run(lib, path, adapter=None, **options):
    with lib.open(path, **options) as engine:
        if adapter:
            engine.add_adapter(adapter)
            engine.generate([5, 6, 7], {adapter: 1.0}, max_new_tokens=2)


def _python_run(path, adapter=None, **options):
    import runtime

    engine = runtime.load(path, backend="llamacpp", **options)
    if adapter:
        engine.add_adapter(adapter)
        engine.generate_ids([5, 6, 7], SamplingParams(max_new_tokens=2), adapters={adapter: 1.0})
    engine.close()


def test_bad_bundle_manifests_refused_with_the_same_message(lib, tmp_path, model_dirs):
    from make_bad_corpus import build_corpus
    from tiny_models import make_model_dir

    from edge_lora.bundle import Bundle

    other = make_model_dir(tmp_path / "_other_base", "llama", seed=1)
    cases = [c for c in build_corpus(tmp_path / "cases", model_dirs["llama"], other) if c.kind == "bundle"]
    assert len(cases) >= 10
    differ = []
    for case in cases:
        want = _python_error(Bundle.open, case.path)
        got = _native_error(_native_run, lib, case.path)
        if got != want:
            differ.append(f"{case.name}: python {want!r} / native {got!r}")
    assert not differ, "\n".join(differ)


def test_broken_backend_files_refused_with_the_same_message(lib, tmp_path, model_dirs):
    from make_bad_corpus import build_backend_corpus
    from security_helpers import make_adapter

    from converters.export import AdapterSource, ExportOptions, export_bundle

    md = ModelDir(model_dirs["llama"])
    make_adapter(md.config, md.fingerprint).save(tmp_path / "sql.safetensors")
    good = export_bundle(
        md.path,
        tmp_path / "good",
        [AdapterSource(tmp_path / "sql.safetensors", "sql")],
        ExportOptions(backends=["onnx", "gguf"], onnx_quants=["int8"], gguf_quants=["q8_0"]),
        show_progress=False,
    )
    cases = [c for c in build_backend_corpus(tmp_path / "cases", good) if c.kind.endswith("llamacpp")]
    assert len(cases) >= 5
    differ = []
    for case in cases:
        adapter = "sql" if case.kind.startswith("backend_adapter_") else None
        want = _python_error(_python_run, case.path, adapter)
        got = _native_error(_native_run, lib, case.path, adapter)
        if got != want:
            differ.append(f"{case.name}: python {want!r} / native {got!r}")
    assert not differ, "\n".join(differ)


@pytest.fixture()
def bundle_copy(bundle, tmp_path):
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("cryptography")
    from edge_lora import signing

    root = tmp_path_factory.mktemp("keys")
    return {name: signing.generate_keypair(root / name) for name in ("good", "other")}


def _same_refusal(lib, path, adapter=None, **options) -> str:
    want = _python_error(_python_run, path, adapter, **options)
    got = _native_error(_native_run, lib, path, adapter, **options)
    assert got == want
    assert want != "accepted"
    return want


def test_signatures_judged_as_the_python_runtime(lib, bundle_copy, keys):
    from edge_lora import signing

    good, other = [str(keys["good"][1])], [str(keys["other"][1])]
    assert "no signature" in _same_refusal(lib, bundle_copy, "a", trusted_keys=good)  # unsigned
    assert "no signature" in _same_refusal(lib, bundle_copy, "a", trusted_keys=[])
    signing.sign_bundle(bundle_copy, keys["good"][0])
    assert "not a trusted key" in _same_refusal(lib, bundle_copy, trusted_keys=other)
    python = _python(bundle_copy, trusted_keys=good)
    with _native(lib, bundle_copy, trusted_keys=good) as native:  # every adapter vouched for by bundle.json
        for adapters in SETS[:4]:
            greedy = SamplingParams(max_new_tokens=8)
            assert native.generate(PROMPT, adapters, max_new_tokens=8) == python.generate_ids(
                PROMPT, greedy, adapters=adapters
            )
    python.close()
    gguf = bundle_copy / "adapters" / "b.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1
    gguf.write_bytes(bytes(data))  # checked against bundle.json even with verify_hashes off: trust needs it
    refused = _same_refusal(lib, bundle_copy, "b", trusted_keys=good, verify_hashes=False)
    assert "does not match its SHA-256" in refused
    manifest = bundle_copy / "bundle.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version":  1'))
    assert "does not match its signature" in _same_refusal(lib, bundle_copy, trusted_keys=good)


def test_public_key_formats(lib, bundle_copy, keys):
    from edge_lora import signing

    signing.sign_bundle(bundle_copy, keys["good"][0])
    raw = signing.load_public_key(keys["good"][1]).raw
    (bundle_copy.parent / "key.raw").write_bytes(raw)
    (bundle_copy.parent / "key.hex").write_text(raw.hex() + "\n")
    for key in (keys["good"][1], bundle_copy.parent / "key.raw", bundle_copy.parent / "key.hex"):
        with lib.open(bundle_copy, trusted_keys=[key]) as engine:
            engine.add_adapter("a")
    (bundle_copy.parent / "key.bad").write_text("not a key")
    assert "not an Ed25519 public key" in _same_refusal(
        lib, bundle_copy, trusted_keys=[bundle_copy.parent / "key.bad"]
    )


def test_hash_and_fingerprint_refusals(lib, bundle_copy, model_dirs, tmp_path):
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
    from runtime.native import NativeError

    source = bundle_copy / "adapters" / "a.safetensors"
    data = bytearray(source.read_bytes())
    data[-1] ^= 1
    source.write_bytes(bytes(data))
    assert "does not match its SHA-256" in _same_refusal(lib, bundle_copy, "a")
    md = ModelDir(model_dirs["llama"])
    foreign = random_adapter(md, seed=9, fingerprint="sha256:" + "ab" * 32)
    path = export_gguf_adapter(foreign, md.config, tmp_path / "foreign.gguf")
    with lib.open(bundle_copy) as engine:
        with pytest.raises(NativeError, match="adapter was made for base .* not this base"):
            engine.add_adapter("foreign", path)
        assert engine.n_adapters == 0
        mine = export_gguf_adapter(random_adapter(md, seed=9), md.config, tmp_path / "mine.gguf")
        engine.add_adapter("mine", mine)  # by path: a GGUF LoRA for this base
        with_it = engine.generate(PROMPT, {"mine": 1.0}, max_new_tokens=4)
        assert with_it != engine.generate(PROMPT, {}, max_new_tokens=4)
        with pytest.raises(NativeError, match="not a GGUF LoRA adapter"):
            engine.add_adapter("st", source)


@pytest.mark.slow
def test_under_address_and_undefined_sanitizers(bundle):
    """The C test program and 200k fuzz mutations with ASan (leaks included) and UBSan: any report fails."""
    sanitized = build("address,undefined")
    env = {
        "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1",
        "LSAN_OPTIONS": f"suppressions={ROOT / 'native' / 'tests' / 'lsan.supp'}",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    runs = [
        [str(sanitized / "test_edge_lora"), str(bundle), "a", "b", "x"],
        [str(sanitized / "fuzz_parsers"), str(ROOT / "native" / "fuzz" / "corpus"), "200000"],
    ]
    for argv in runs:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "runtime error" not in done.stderr, done.stderr[-3000:]  # UBSan reports without failing


@pytest.mark.slow
def test_dora_runs_as_the_bundles_merged_variant(lib, model_dirs, tmp_path):
    """DoRA has no GGUF LoRA: with export --gguf-merged-variants the bundle ships it merged into a copy of
    each GGUF base, which the library (and the Python runtime, instead of merging at add time) runs."""
    from converters.export import AdapterSource, ExportOptions, export_bundle
    from runtime.native import NativeError

    md = ModelDir(model_dirs["llama"])
    random_adapter(md, seed=4, dora=True, std=0.3).save(tmp_path / "d.safetensors")
    random_adapter(md, seed=1, std=0.3).save(tmp_path / "a.safetensors")
    sources = [AdapterSource(tmp_path / "d.safetensors", "d"), AdapterSource(tmp_path / "a.safetensors", "a")]
    options = ExportOptions(backends=["gguf"], gguf_quants=["f32"])
    plain = export_bundle(md.path, tmp_path / "plain", sources, options)
    with lib.open(plain) as engine:
        with pytest.raises(NativeError, match="ships none for f32.*hint: export the bundle with --gguf-merg"):
            engine.add_adapter("d")
        assert engine.n_adapters == 0
    options = ExportOptions(backends=["gguf"], gguf_quants=["f32", "q8_0"], gguf_merged_variants=True)
    shipped = export_bundle(md.path, tmp_path / "shipped", sources, options)
    assert sorted(Bundle.open(shipped).adapters["d"]["gguf_variants"]) == ["f32", "q8_0"]
    for quant in ("f32", "q8_0"):
        python = _python_engine(shipped, quant, ("d", "a"))
        assert python._adapters["d"].handle.variant.shipped  # the bundle's file, not one merged at add
        greedy = SamplingParams(max_new_tokens=10)
        with lib.open(shipped, quant=quant, precise=True, threads=2) as native:
            native.add_adapter("d")
            native.add_adapter("a")
            for adapters in ({"d": 1.0}, {}, {"a": 1.0}, {"d": 1.0}):
                want = python.generate_ids(PROMPT, greedy, adapters=adapters)
                assert native.generate(PROMPT, adapters, max_new_tokens=10) == want, (quant, adapters)
                want = python.logits(PROMPT, adapters=adapters)
                np.testing.assert_allclose(native.logits(PROMPT, adapters), want, atol=1e-4)
            for adapters in ({"d": 0.5}, {"d": 1.0, "a": 1.0}):  # a variant runs alone, at scale 1
                want = _python_error(python.generate_ids, PROMPT, greedy, adapters=adapters)
                assert "alone and at scale 1.0 only" in want
                assert _native_error(native.generate, PROMPT, adapters, max_new_tokens=10) == want
            native.remove_adapter("d")  # the variant's context goes; the base serves on
            base = python.generate_ids(PROMPT, greedy, adapters={})
            assert native.generate(PROMPT, {}, max_new_tokens=10) == base
        python.close()
