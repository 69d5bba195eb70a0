"""The ARM64 lane's verdict (scripts/arm64_compare.py) on synthetic numbers: it passes what is within a
tolerance and fails what leaves it, so the lane (scripts/arm64-lane.sh) cannot pass by accident."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from arm64_compare import TOLERANCES, compare, same_side_checks  # noqa: E402


def _results(quant: str, logits: np.ndarray, tokens: list[int]) -> dict[str, np.ndarray]:
    key = f"llama/llamacpp/{quant}/active"
    return {f"{key}/logits": logits, f"{key}/tokens": np.asarray(tokens)}


@pytest.fixture
def x86():
    """Logits of a tiny random model: all below one, so the tolerances are absolute."""
    return np.clip(np.random.default_rng(0).normal(0, 0.2, (10, 320)), -0.9, 0.9).astype(np.float32)


@pytest.mark.parametrize("quant", ["f32", "fp32", "int8", "q8_0", "q4_0", "int4", "q6_k", "bf16"])
def test_within_tolerance_passes(x86, quant):
    klass = {"f32": "exact", "fp32": "exact", "int8": "8-bit", "q8_0": "8-bit", "bf16": "half"}
    tol = TOLERANCES[klass.get(quant, "6-bit" if quant == "q6_k" else "4-bit")].logits
    arm = x86.copy()
    arm[3, 7] += 0.9 * tol
    verdict = compare(_results(quant, arm, [1, 2, 3]), _results(quant, x86, [1, 2, 3]))
    assert verdict.ok, verdict.failures()
    assert verdict.rows[0].diff == pytest.approx(0.9 * tol, rel=1e-2)


@pytest.mark.parametrize(
    "quant, klass", [("f32", "exact"), ("int8", "8-bit"), ("q4_0", "4-bit"), ("q5_1", "5-bit")]
)
def test_leaving_tolerance_fails(x86, quant, klass):
    arm = x86.copy()
    arm[9, 0] += 2 * TOLERANCES[klass].logits
    verdict = compare(_results(quant, arm, [1, 2]), _results(quant, x86, [1, 2]))
    assert not verdict.ok
    assert verdict.failures() == [
        f"llama/llamacpp/{quant}/active: max |diff| {verdict.rows[0].diff:.3g} > {verdict.rows[0].tol:g} "
        f"({verdict.rows[0].quant_class})"
    ]


def test_large_logits_scale_the_bound(x86):
    """New-token rows drive logits to tens: there the tolerance is relative to the largest logit."""
    big = x86 * 50
    arm = big.copy()
    arm[2, 2] += 20 * TOLERANCES["exact"].logits  # 2e-4 on logits up to 45: 4.4e-6 relative
    verdict = compare(_results("f32", arm, [1]), _results("f32", big, [1]))
    assert verdict.ok, verdict.failures()
    arm[2, 2] += 60 * TOLERANCES["exact"].logits
    assert not compare(_results("f32", arm, [1]), _results("f32", big, [1])).ok


def test_exact_needs_equal_tokens_lower_bits_do_not(x86):
    assert not compare(_results("fp32", x86, [1, 2]), _results("fp32", x86, [1, 5])).ok
    verdict = compare(_results("int4", x86, [1, 2]), _results("int4", x86, [1, 5]))
    assert verdict.ok and verdict.rows[0].tokens == "differ"


def test_nan_missing_and_shape_fail(x86):
    arm = x86.copy()
    arm[0, 0] = np.nan
    assert not compare(_results("q4_0", arm, [1]), _results("q4_0", x86, [1])).ok
    missing = compare({}, _results("q4_0", x86, [1]))
    assert missing.failures()[0].startswith("2 results missing on ARM")
    shaped = compare(_results("q4_0", x86[:5], [1]), _results("q4_0", x86, [1]))
    assert "logits shape" in shaped.failures()[0]


def test_unknown_quant_fails(x86):
    verdict = compare(_results("q2_k", x86, [1]), _results("q2_k", x86, [1]))
    assert verdict.failures() == ["llama/llamacpp/q2_k/active: no tolerance for quantization 'q2_k'"]


def test_swap_back_must_reproduce_active(x86):
    results = _results("q4_0", x86, [1])
    results["llama/llamacpp/q4_0/back/logits"] = x86.copy()
    assert same_side_checks(results) == []
    results["llama/llamacpp/q4_0/back/logits"] = x86 + 1e-7
    assert same_side_checks(results) == ["llama/llamacpp/q4_0/back: differs from 'active' after a swap back"]
