"""The lane's verdict: ARM64 results against the x86-64 ones, case by case, within stated tolerances.

Pure numpy, no runtime: the pytest in tests/test_arm64_compare.py drives it with synthetic numbers.
A case passes when the largest ``|arm - x86|`` over its logits is within ``tol * max(1, scale)``,
``scale`` being the case's largest ``|x86 logit|``: absolute for logits of order one (the tiny models'
are below one), relative where an adapter's new-token rows drive logits to tens. The exact
quantizations must also give the same greedy tokens; the lower-bit ones may flip a greedy token
where two logits nearly tie (tiny random models have many), so their tokens are reported only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    logits: float
    tokens: bool  # greedy tokens must be equal


# About 3x the largest difference measured on the lane's bundles (QEMU 10.0, cortex-a76/a72/max,
# 2026-12-05: exact 7.5e-7, half 9.2e-4, 8-bit 9.6e-3 (ONNX int8 on the A72: fp32 activations where
# x86 rounds them to int8), 6-bit 4e-7, 5-bit 2.3e-3, 4-bit 2.1e-2 (ONNX int4 with DoRA)); the exact
# class is the 1e-5. docs/mobile.md, "Linux boards", has the table per core and backend.
TOLERANCES = {
    "exact": Tolerance(1e-5, True),
    "half": Tolerance(3e-3, False),
    "8-bit": Tolerance(3e-2, False),
    "6-bit": Tolerance(1e-2, False),
    "5-bit": Tolerance(1e-2, False),
    "4-bit": Tolerance(6e-2, False),
}
QUANT_CLASS = {
    "fp32": "exact",
    "f32": "exact",
    "fp16": "half",
    "f16": "half",
    "bf16": "half",
    "int8": "8-bit",
    "q8_0": "8-bit",
    "q6_k": "6-bit",
    "q5_0": "5-bit",
    "q5_1": "5-bit",
    "q5_k_m": "5-bit",
    "int4": "4-bit",
    "q4_0": "4-bit",
    "q4_1": "4-bit",
    "q4_k_m": "4-bit",
}


@dataclass
class Row:
    key: str  # TARGET/CASE
    quant_class: str
    diff: float  # max |arm - x86| over the logits
    tol: float  # the class's tolerance times max(1, scale)
    tokens: str  # "same", "differ", "-" (no greedy run)
    ok: bool
    scale: float = 1.0  # max |x86 logit| of the case


@dataclass
class Verdict:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failures that are not a row (missing, invariants)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rows)

    def failures(self) -> list[str]:
        bad = [
            f"{r.key}: max |diff| {r.diff:.3g} > {r.tol:g} ({r.quant_class})"
            if r.diff > r.tol
            else f"{r.key}: greedy tokens differ ({r.quant_class})"
            for r in self.rows
            if not r.ok
        ]
        return self.problems + bad

    def by_class(self) -> dict[str, float]:
        """The largest difference per quantization class, relative to ``max(1, scale)`` (docs/mobile.md)."""
        out: dict[str, float] = {}
        for r in self.rows:
            out[r.quant_class] = max(out.get(r.quant_class, 0.0), r.diff / max(1.0, r.scale))
        return out


def quant_of(key: str) -> str:
    """``family/backend/quant[/variant]/case/...`` -> quant."""
    return key.split("/")[2]


def compare(arm: dict[str, np.ndarray], x86: dict[str, np.ndarray]) -> Verdict:
    """``arm`` and ``x86``: ``{TARGET/CASE/logits|tokens|ids: array}`` as scripts/arm64_cases.py writes."""
    verdict = Verdict()
    missing = sorted(set(x86) - set(arm))
    if missing:
        verdict.problems.append(f"{len(missing)} results missing on ARM, first {missing[0]}")
    for key in sorted(k for k in x86 if k.endswith("/logits") and k in arm):
        case = key.removesuffix("/logits")
        klass = QUANT_CLASS.get(quant_of(key))
        if klass is None:
            verdict.problems.append(f"{case}: no tolerance for quantization {quant_of(key)!r}")
            continue
        tol = TOLERANCES[klass]
        a, b = arm[key], x86[key]
        if a.shape != b.shape:
            verdict.problems.append(f"{case}: logits shape {a.shape} on ARM, {b.shape} on x86")
            continue
        diff = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        diff = diff if np.isfinite(diff) else float("inf")
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        tokens = "-"
        if f"{case}/tokens" in x86:
            same = np.array_equal(arm.get(f"{case}/tokens", np.array([-1])), x86[f"{case}/tokens"])
            tokens = "same" if same else "differ"
        bound = tol.logits * max(1.0, scale)
        ok = diff <= bound and not (tol.tokens and tokens == "differ")
        verdict.rows.append(Row(case, klass, diff, bound, tokens, ok, scale))
    return verdict


def same_side_checks(results: dict[str, np.ndarray]) -> list[str]:
    """Invariants within one side: returning to an adapter after a swap gives its logits again, exactly."""
    problems = []
    for key in results:
        if key.endswith("/back/logits"):
            active = results[key.replace("/back/", "/active/")]
            if not np.array_equal(results[key], active):
                problems.append(f"{key.removesuffix('/logits')}: differs from 'active' after a swap back")
    return problems


def format_table(verdict: Verdict, limit: int = 0) -> str:
    """One line per row (the worst ``limit`` when given), worst difference first within its class."""
    rows = sorted(verdict.rows, key=lambda r: (r.ok, -r.diff / r.tol))
    rows = rows[:limit] if limit else rows
    lines = [f"{'':4} {'target/case':44} {'class':6} {'max|diff|':>10} {'bound':>8} {'scale':>6}  tokens"]
    for r in rows:
        lines.append(
            f"{'ok' if r.ok else 'FAIL':4} {r.key:44} {r.quant_class:6} {r.diff:10.3g} {r.tol:8.2g} "
            f"{r.scale:6.2g}  {r.tokens}"
        )
    return "\n".join(lines)
