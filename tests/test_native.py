"""The C library (native/, include/edge_lora.h) against the Python runtime on the same bundles: the
same greedy tokens and logits (base, one adapter, stacked, swapped, new tokens, q8_0), the same
one-line refusals of bad bundles, adapters and signatures; its own C test program and fuzz driver."""

import subprocess

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from native_build import ROOT, build

from edge_lora.model_dir import ModelDir
from runtime.sampling import SamplingParams

PROMPT = [5, 17, 42, 99, 120, 7, 33]
SETS = [{}, {"a": 1.0}, {"b": 1.0}, {"a": 1.0, "b": 0.5}, {"a": 1.0}, {"tok": 1.0}, {"a": 0.7, "tok": 1.0}]


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


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    adapters = {
        "a": random_adapter(md, seed=1, std=0.3),
        "b": random_adapter(md, seed=2, rank=8, rslora=True, std=0.3),
        "tok": _with_new_tokens(md),
    }
    root = tmp_path_factory.mktemp("native") / "b"
    return build_bundle(md.path, root, adapters, backends=("gguf",), gguf_quants=("f32", "q8_0"))


def _python(bundle, quant="f32", **options):
    import runtime

    engine = runtime.load(bundle, backend="llamacpp", quant=quant, precise=True, threads=2, **options)
    for name in ("a", "b", "tok"):
        engine.add_adapter(name)
    return engine


def _native(lib, bundle, quant="f32", **options):
    engine = lib.open(bundle, quant=quant, precise=True, threads=2, **options)
    for name in ("a", "b", "tok"):
        engine.add_adapter(name)
    return engine


def test_c_test_program(native_dir, bundle):
    program = native_dir / "test_edge_lora"
    done = subprocess.run([str(program), str(bundle), "a", "b"], capture_output=True, text=True, timeout=300)
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


# --- the same refusals ------------------------------------------------------------------------


def _python_error(call, *args) -> str:
    from edge_lora.errors import EdgeLoraError

    try:
        call(*args)
    except EdgeLoraError as err:
        return str(err)
    return "accepted"


def _native_error(call, *args) -> str:
    from runtime.native import NativeError

    try:
        call(*args)
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
