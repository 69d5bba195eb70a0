"""The 4/5-bit scale search against llama.cpp's own quantizer (``ggml_quantize_chunk`` with an
importance matrix, from the libggml that llama-cpp-python ships), and its use in both exports."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from edge_lora.block_search import search_scales
from edge_lora.importance import Importance, block_importance, load_importance

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def _llama_quantize(weight: np.ndarray, qtype, importance: np.ndarray | None) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    rows, cols = weight.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, cols // block * size), np.uint8)
    weight = np.ascontiguousarray(weight, np.float32)
    imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
    fn(
        int(qtype),
        weight.ctypes.data,
        out.ctypes.data,
        0,
        rows,
        cols,
        None if imp is None else imp.ctypes.data,
    )
    return out


def _weighted_error(weight: np.ndarray, approx: np.ndarray, importance: np.ndarray) -> float:
    sigma2 = np.mean(weight * weight, axis=1, keepdims=True)
    w = importance[None, :] * np.sqrt(sigma2 + weight * weight)
    return float(np.sum(w * (weight - approx) ** 2))


@pytest.fixture
def heavy_tailed():
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((256, 1024)) * rng.gamma(1.0, 1.0, 1024)).astype(np.float32) * 0.02
    return weight, rng.gamma(0.5, 1.0, 1024).astype(np.float32)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_search_matches_llama_cpp_with_an_imatrix(heavy_tailed, qtype):
    """Block for block as llama.cpp's make_qx_quants picks them; where float rounding breaks a near
    tie the other way, the weighted error is the same to 1e-3 overall."""
    from edge_lora.gguf_format.quant import decode, encode

    qt = T[qtype]
    weight, importance = heavy_tailed
    ours = encode(weight, qt, importance)
    theirs = _llama_quantize(weight, qt, importance)
    blocks = weight.shape[1] // 32
    same = (ours.reshape(256, blocks, -1) == theirs.reshape(256, blocks, -1)).all(axis=-1)
    assert same.mean() > 0.95
    err_ours = _weighted_error(weight, decode(ours, qt, weight.shape), importance)
    err_theirs = _weighted_error(weight, decode(theirs, qt, weight.shape), importance)
    assert err_ours <= err_theirs * 1.001
    rtn = gguf.quants.dequantize(gguf.quants.quantize(weight, qt), qt).reshape(weight.shape)
    assert err_ours < 0.9 * _weighted_error(weight, rtn, importance)


def test_search_without_importance_beats_round_to_nearest(heavy_tailed):
    weight, _ = heavy_tailed
    blocks = weight.reshape(256, -1, 32)
    scale, codes = search_scales(blocks, 8)
    searched = (scale[..., None] * codes).reshape(weight.shape)
    rtn = gguf.quants.dequantize(gguf.quants.quantize(weight, T.Q4_0), T.Q4_0).reshape(weight.shape)
    assert np.square(searched - weight).mean() < np.square(rtn - weight).mean()
    assert codes.min() >= -8 and codes.max() <= 7


def test_zero_blocks_and_padding():
    weight = np.zeros((4, 64), np.float32)
    weight[0, :32] = np.linspace(-1, 1, 32)
    scale, codes = search_scales(weight.reshape(4, 2, 32), 8)
    assert np.all(scale[1:] == 0) and np.all(codes[1:] == 0) and scale[0, 1] == 0
    assert block_importance(np.ones(40, np.float32), 40, 32)[1].tolist() == [1.0] * 8 + [0.0] * 24


def test_importance_file_round_trip(tmp_path):
    imp = Importance(
        {"model.layers.0.self_attn.q_proj": np.arange(8, dtype=np.float32)}, source="t", tokens=9
    )
    back = load_importance(imp.save(tmp_path / "importance.safetensors"))
    assert back.digest == imp.digest and back.source == "t" and back.tokens == 9
    assert np.array_equal(back.for_module("model.layers.0.self_attn.qkv_proj"), np.arange(8))
    assert back.for_tensor("model.layers.0.self_attn.k_proj.weight") is None
