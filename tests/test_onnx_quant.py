"""Quantized exports: the numpy block quantizers, measured agreement with PyTorch, merge into quantized
weights."""

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from onnx_helpers import torch_logits

from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import weight_quant as q
from runtime.onnx.backend import OnnxEngine


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 70])  # 70: a padded last block
def test_nbits_roundtrip_error_is_within_half_a_step(bits, k):
    """8 bits: nearest rounding. 4 bits (zero points): scale and zero point searched for the least
    error, so a clipped extreme may sit further off, and the total error is below the min/max grid's."""
    w = np.random.default_rng(bits + k).normal(0, 1, (24, k)).astype(np.float32)
    nb = q.quantize_nbits(w, bits, 32)
    assert nb.packed.shape == (24, 3 if k == 70 else 2, 32 * bits // 8)
    back = q.dequantize_nbits(nb)
    step = np.repeat(nb.scales.reshape(24, -1), 32, axis=1)[:, :k]
    assert back.shape == w.shape and (np.abs(back - w) <= step * (0.5 if bits == 8 else 2.0) + 1e-6).all()
    if bits == 4:
        padded = np.zeros((24, nb.packed.shape[1] * 32), np.float32)
        padded[:, :k] = w
        blocks = padded.reshape(24, -1, 32)
        lo, hi = np.minimum(blocks.min(2), 0), np.maximum(blocks.max(2), 0)
        scale = np.where(hi > lo, (hi - lo) / 15, 1.0)[..., None]
        zp = np.clip(np.round(-lo[..., None] / scale), 0, 15)
        minmax = ((np.clip(np.round(blocks / scale) + zp, 0, 15) - zp) * scale).reshape(24, -1)[:, :k]
        assert np.square(back - w).mean() < np.square(minmax - w).mean()


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_nbits_needs_no_zero_points(bits):
    """Symmetric weights dequantize with MatMulNBits' default zero point (8 / 128), so the graph
    can leave them out; 4 bits use q4_0's full [-8, 7] range."""
    w = np.random.default_rng(bits).normal(0, 1, (24, 70)).astype(np.float32)
    nb = q.quantize_nbits(w, bits, 32, symmetric=True)
    explicit = q.dequantize_nbits(nb)
    nb.zero_points = None
    implied = q.dequantize_nbits(nb)
    np.testing.assert_array_equal(explicit, implied)
    step = np.abs(np.repeat(nb.scales.reshape(24, -1), 32, axis=1)[:, :70])
    # 4 bits: searched scales (edge_lora/block_search.py) may clip the peak's neighbours by up to ~2 steps
    assert (np.abs(implied - w) <= step * (2.0 if bits == 4 else 0.5) + 1e-6).all()


def test_linear_layers_run_without_zero_points(quant_bundle):
    import onnx

    _, _, roots = quant_bundle
    graph = onnx.load(roots["fast"] / "onnx/int4-fast/model.plain.onnx", load_external_data=False).graph
    linear = [n for n in graph.node if n.op_type == "MatMulNBits" and not n.name.startswith("lm_head")]
    assert linear and all(len(n.input) == 3 for n in linear)


def test_int8_channel_and_int4_block_roundtrip():
    w = np.random.default_rng(3).normal(0, 1, (40, 96)).astype(np.float32)
    q8, s8 = q.quantize_int8_channel(w)
    assert q8.shape == (96, 40) and np.abs(q.dequantize_int8_channel(q8, s8) - w).max() <= s8.max() / 2 + 1e-6
    q4, s4 = q.quantize_int4_block_t(w, 32)
    assert q4.min() >= -8 and q4.max() <= 7
    assert np.array_equal(q.unpack_int4(np.frombuffer(q.pack_int4(q4), np.uint8), q4.shape), q4)
    # searched scales (edge_lora/block_search.py): a clipped peak may sit up to ~2 steps off, the
    # total error is below round-to-nearest's at the peak's scale
    err = q.dequantize_int4_block_t(q4, s4, 32) - w
    assert np.abs(err).max() <= 2 * s4.max() + 1e-6
    blocks = w.reshape(40, 3, 32)
    rtn_scale = np.abs(blocks).max(axis=2, keepdims=True) / 7.0
    rtn = (np.clip(np.round(blocks / rtn_scale), -8, 7) * rtn_scale).reshape(40, 96)
    assert np.square(err).mean() < np.square(rtn - w).mean()


EXPORTS = [("int8", "fast"), ("int4", "fast"), ("int8", "portable"), ("int4", "portable"), ("fp16", "fast")]


@pytest.fixture(scope="module")
def quant_bundle(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["qwen2"])
    adapter = random_adapter(
        md, seed=4, b_std=0.02, mixed_ranks=1
    )  # an adapter of realistic size next to the weights
    root = tmp_path_factory.mktemp("quant")
    roots = {  # the exporter writes one ONNX variant per bundle
        variant: build_bundle(
            md.path,
            root / variant,
            {"a": adapter},
            onnx_quants=[q for q, v in EXPORTS if v == variant],
            onnx_variant=variant,
        )
        for variant in dict.fromkeys(v for _, v in EXPORTS)
    }
    return md, adapter, roots


@pytest.mark.parametrize("quant,variant", EXPORTS)
def test_quantized_agreement_with_pytorch(quant_bundle, quant, variant):
    md, adapter, roots = quant_bundle
    engine = OnnxEngine(roots[variant], quant=quant, variant=variant)
    engine.add_adapter("a")
    ids = [int(t) for t in np.random.default_rng(5).integers(0, md.config.vocab_size, 48)]
    for chosen, parts in (({}, []), ({"a": 1.0}, [(adapter, 1.0)])):
        want, got = torch_logits(md.path, ids, parts), engine.logits(ids, adapters=chosen)
        diff = np.abs(got - want).max()
        top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
        print(
            f"{quant}-{variant} adapters={chosen}: max |diff| {diff:.4f} (logit range {np.ptp(want):.2f}), "
            f"top-1 agreement {top1:.3f}"
        )
        bound = {"fp16": 1e-3, "int8": 0.02, "int4": 0.25}[quant]
        assert diff < bound and top1 >= {"fp16": 1.0, "int8": 0.9, "int4": 0.6}[quant]


@pytest.mark.parametrize(
    "quant,variant", [("int4", "fast"), ("int8", "fast"), ("int8", "portable"), ("int4", "portable")]
)
def test_merged_equals_unmerged_within_quantization_error(quant_bundle, quant, variant):
    md, adapter, roots = quant_bundle
    engine = OnnxEngine(roots[variant], quant=quant, variant=variant)
    engine.add_adapter("a")
    ids = [int(t) for t in np.random.default_rng(6).integers(0, md.config.vocab_size, 32)]
    torch_base = torch_logits(md.path, ids)
    base_error = np.abs(engine.logits(ids, adapters={}) - torch_base).max()
    unmerged = engine.logits(ids, adapters={"a": 1.0})
    engine.merge("a")
    merged = engine.logits(ids, adapters={})
    reference = torch_logits(md.path, ids, [(adapter, 1.0)])
    gap = np.abs(merged - unmerged).max()
    print(
        f"{quant}-{variant}: |merged - unmerged| {gap:.4f}, base quantization error {base_error:.4f}, "
        f"|merged - fp32 reference| {np.abs(merged - reference).max():.4f}"
    )
    assert gap < 3 * base_error
    assert np.abs(merged - reference).max() < 3 * base_error
    assert (
        np.abs(merged - reference).mean() < 0.5 * np.abs(merged - torch_base).mean()
    )  # the merge did move the model
