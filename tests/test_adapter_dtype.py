"""`export --adapter-dtype fp32|fp16|int8`: what each file stores, and that both backends run the
smaller adapters like the fp32 one (logits within a stated bound, the same greedy tokens)."""

from __future__ import annotations

import numpy as np
import pytest
from factories import adapter_file

from converters.export import AdapterSource, ExportOptions, add_adapter, export_bundle
from edge_lora.adapter_dtype import q8_0_roundtrip, rounded
from edge_lora.app.cli import main
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format import lora_feeds
from edge_lora.safetensors_file import SafetensorsFile

DTYPES = ("fp32", "fp16", "int8")
# max |logit diff| against the same bundle's fp32 adapter (measured: 0.001 fp16, 0.015 int8 on both backends).
# llama.cpp multiplies a q8_0 lora_a by 8-bit activations as well, so int8 is looser there.
BOUNDS = {
    ("onnx", "fp16"): 0.02,
    ("onnx", "int8"): 0.1,
    ("llamacpp", "fp16"): 0.05,
    ("llamacpp", "int8"): 0.3,
}
PROMPT = list(range(3, 19))


@pytest.fixture(scope="module")
def bundles(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_dtype")
    a = adapter_file(model_dirs["llama"], root / "a.safetensors", seed=5, alpha=4.0, std=0.2)
    out = {}
    for dtype in DTYPES:
        options = ExportOptions(
            backends=["onnx", "gguf"], onnx_quants=["fp32"], gguf_quants=["f32"], adapter_dtype=dtype
        )
        out[dtype] = export_bundle(
            model_dirs["llama"], root / dtype, [AdapterSource(a, "a")], options, show_progress=False
        )
    return out


def test_files_store_the_chosen_dtype(bundles):
    import gguf
    import onnxruntime as ort

    sizes = {}
    for dtype, path in bundles.items():
        entry = Bundle.open(path).adapters["a"]
        assert entry["dtype"] == dtype
        source = SafetensorsFile(path / entry["source"])
        assert {info.dtype for info in source.tensors.values()} == {"F32" if dtype == "fp32" else "F16"}
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path / entry["gguf"]).tensors}
        want_a, want_b = {"fp32": ("F32", "F32"), "fp16": ("F16", "F16"), "int8": ("Q8_0", "F16")}[dtype]
        assert types["blk.0.attn_q.weight.lora_a"] == want_a  # 64 inputs: whole q8_0 blocks
        assert types["blk.0.attn_q.weight.lora_b"] == want_b  # rank-4 rows cannot be q8_0
        # the .onnx_adapter keeps the graph's input dtype: ORT binds it as it is
        params = ort.AdapterFormat.read_adapter(str(path / entry["onnx"])).get_parameters()
        assert {v.numpy().dtype for v in params.values()} == {np.dtype(np.float32)}
        sizes[dtype] = (path / entry["gguf"]).stat().st_size, (path / entry["source"]).stat().st_size
    # a tiny model's files are a good part header: the tensors' bytes halve, the files less
    assert sizes["int8"][0] < sizes["fp16"][0] < 0.6 * sizes["fp32"][0]
    assert sizes["fp16"][1] < 0.6 * sizes["fp32"][1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_smaller_dtypes_run_like_fp32(bundles, backend):
    import runtime
    from runtime.sampling import SamplingParams

    engines = {}
    for dtype, path in bundles.items():
        precise = {"precise": True} if backend == "llamacpp" else {}
        engines[dtype] = runtime.load(path, backend=backend, **precise)
        engines[dtype].add_adapter("a")
    # greedy tokens of the fp32 adapter, then every dtype's logits over prompt + those tokens
    fp32 = engines["fp32"]
    sequence = PROMPT + fp32.generate_ids(PROMPT, SamplingParams(max_new_tokens=12), adapters={"a": 1.0})
    logits = {dtype: engine.logits(sequence, adapters={"a": 1.0}) for dtype, engine in engines.items()}
    assert np.abs(logits["fp32"] - fp32.logits(sequence, adapters={})).max() > 0.5  # the adapter shows
    top2 = np.sort(logits["fp32"], axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    for dtype in ("fp16", "int8"):
        diff = float(np.abs(logits[dtype] - logits["fp32"]).max())
        flips = logits[dtype].argmax(-1) != logits["fp32"].argmax(-1)
        print(
            f"{backend} {dtype} adapter: max |logit diff| vs fp32 = {diff:.4f}, greedy agreement "
            f"{100 * (1 - flips.mean()):.0f}% of {len(sequence)} positions"
        )
        assert diff < BOUNDS[backend, dtype]
        # greedy agrees wherever fp32's choice is not a near tie (the top two closer than twice the diff)
        assert not (flips & (margin > 2 * diff)).any()


def test_q8_0_rounding_is_gguf_py_s():
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32) * 0.1
    x[3, :32] = 0  # an all-zero block
    ref = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(q8_0_roundtrip(x), ref)


def test_rounded_adapter_keeps_fp32_as_it_is(model_dirs, tmp_path):
    from edge_lora.adapter import Adapter

    adapter = Adapter.load(
        adapter_file(model_dirs["llama"], tmp_path / "a.safetensors", seed=1, alpha=4.0, std=0.3)
    )
    assert rounded(adapter, "fp32") is adapter
    half = rounded(adapter, "fp16")
    w, h = next(iter(adapter.modules.values())), next(iter(half.modules.values()))
    assert h.a.dtype == np.float32 and np.array_equal(h.a, w.a.astype(np.float16).astype(np.float32))
    with pytest.raises(EdgeLoraError, match="unknown adapter dtype"):
        rounded(adapter, "int4")


def test_add_adapter_and_cli_take_the_dtype(bundles, model_dirs, tmp_path):
    import shutil

    import gguf

    path = tmp_path / "bundle"
    shutil.copytree(bundles["fp32"], path)
    b = adapter_file(model_dirs["llama"], tmp_path / "b.safetensors", seed=6, alpha=4.0, std=0.3)
    entry = add_adapter(path, AdapterSource(b, "b"), show_progress=False, adapter_dtype="int8")
    assert entry["dtype"] == "int8"
    assert main(["export", "--add-adapter", str(path), f"{b}:c", "--adapter-dtype", "fp16", "--quiet"]) == 0
    entry = Bundle.open(path).adapters["c"]
    assert entry["dtype"] == "fp16"
    types = {t.tensor_type.name for t in gguf.GGUFReader(path / entry["gguf"]).tensors}
    assert types == {"F16"}
    with pytest.raises(EdgeLoraError, match="unknown adapter dtype"):
        ExportOptions(adapter_dtype="q4").validate()


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_source_and_onnx_adapter_hold_the_same_values(bundles, dtype):
    """The runtime builds ONNX feeds from the .safetensors: they must equal the exported .onnx_adapter."""
    import onnxruntime as ort

    from edge_lora.adapter import Adapter
    from edge_lora.onnx_format import names

    path = bundles[dtype]
    b = Bundle.open(path)
    entry = b.adapters["a"]
    adapter = Adapter.load(path / entry["source"], base=b.config)
    feeds = lora_feeds.stack_lora([(adapter, 1.0)], names.lora_slots(b.config))
    feeds.update(
        lora_feeds.zero_pads(names.lora_slots(b.config), skip=feeds)
    )  # groups it leaves out (WebGPU)
    params = ort.AdapterFormat.read_adapter(str(path / entry["onnx"])).get_parameters()
    assert set(params) == set(feeds)
    for key, value in params.items():
        np.testing.assert_array_equal(value.numpy(), feeds[key])
