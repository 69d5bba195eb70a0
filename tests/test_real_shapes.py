"""Real checkpoint shapes end to end: train a few steps, export, run on both backends, compare to PyTorch.

Each shape of :mod:`real_shapes` (published widths, vocabularies, head sizes, GQA ratios and rope
settings, cut to one or two layers, random bf16 weights) is trained for two steps, exported with
its trained adapter through ``export_bundle``, and run by the runtime; every export's logits, base
and with the adapter, are compared with our PyTorch model's.

What runs by default is sized for a 2-core machine (:data:`PLANS`): every ONNX quantization in both
graph variants and every GGUF quantization on the two SmolLM2 shapes; the widths that do not fill
K-quant super-blocks (Qwen2.5-0.5B's 896) through int4 and the K-quants; fp32 / f32 on the large
shapes (plus the portable graph, int8 and q8_0 on the one shape with a decoupled head size). The
whole module takes about 5 minutes on 2 cores and peaks near 7 GB of memory (the Mistral-7B layer).
``EDGE_LORA_REAL_SHAPES_FULL=1`` runs every quantization in both variants on every shape (far longer:
each export of the Mistral-7B layer takes 10-35 s here, and there are 19 per shape); without it the
cases outside the plan are not generated at all, so nothing is skipped silently.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from real_shapes import DECOUPLED_HEAD_DIM, REAL_SHAPES, RealShape, make_real_model_dir

from converters.export import (
    GGUF_QUANTS,
    ONNX_QUANTS,
    AdapterSource,
    ExportOptions,
    export_bundle,
)
from edge_lora.adapter import Adapter
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import names as onnx_names

pytestmark = pytest.mark.slow

FULL_ENV = "EDGE_LORA_REAL_SHAPES_FULL"
FULL = os.environ.get(FULL_ENV) == "1"
SHAPES = {**REAL_SHAPES, DECOUPLED_HEAD_DIM.name: DECOUPLED_HEAD_DIM}
ADAPTER = "trained"
K_BLOCK = 256  # values per K-quant super-block row
# llama.cpp's per-tensor fallback when a row does not fill whole 256-value super-blocks
K_FALLBACK = {"q4_k_m": "Q5_0", "q5_k_m": "Q5_1", "q6_k": "Q8_0"}
K_TYPES = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}

EVERY_ONNX = tuple((quant, variant) for variant in onnx_names.VARIANTS for quant in ONNX_QUANTS)


@dataclass(frozen=True)
class ShapePlan:
    """What one shape runs by default: ONNX ``(quant, variant)`` pairs and GGUF quants."""

    onnx: tuple[tuple[str, str], ...]
    gguf: tuple[str, ...]


FULL_PLAN = ShapePlan(EVERY_ONNX, GGUF_QUANTS)
FLOAT_PLAN = ShapePlan((("fp32", "fast"),), ("f32",))
PLANS = {
    "SmolLM2-135M": FULL_PLAN,
    "SmolLM2-360M": FULL_PLAN,
    # 896 = 3.5 x 256: the K-quants fall back per tensor; int4 blocks of 32 in both graph variants
    "Qwen2.5-0.5B": ShapePlan(
        (("fp32", "fast"), ("int8", "fast"), ("int4", "fast"), ("int4", "portable")),
        ("f32", "q8_0", "q4_k_m"),
    ),
    "Qwen2.5-1.5B": FLOAT_PLAN,
    "Llama-3.2-1B": FLOAT_PLAN,
    "TinyLlama-1.1B": FLOAT_PLAN,
    "Mistral-7B": FLOAT_PLAN,
    DECOUPLED_HEAD_DIM.name: ShapePlan(
        (("fp32", "fast"), ("fp32", "portable"), ("int4", "fast"), ("int8", "portable")),
        ("f32", "q8_0", "q4_k_m"),
    ),
}


MERGE_SHAPE = "Qwen2.5-0.5B"  # 896 wide: requantizing blocks and K-quant fallbacks at a real odd width
MERGE_CASES = (
    ("onnx", "int8", "fast"),
    ("llamacpp", "q8_0", None),
    ("onnx", "int4", "fast"),
    ("llamacpp", "q4_k_m", None),
)
# A known limitation, kept visible: the ONNX merge dequantizes, adds the delta and requantizes onto the
# same 4-bit grid (the graph's MatMulNBits fixes the bit width), so an adapter smaller than half a
# quantization step rounds away (merged ~= base; measured on this shape: merged vs unmerged 5.0 std,
# merged vs base 0.19). The GGUF merge writes merged tensors of a sub-8-bit base as q8_0 instead.
LOSSY_4BIT_MERGE = pytest.mark.xfail(
    strict=True,
    reason="merging into a 4-bit ONNX base requantizes onto the same grid and "
    "rounds a small adapter away (edge_lora/onnx_format/weight_store.py)",
)


def plan_for(name: str) -> ShapePlan:
    return FULL_PLAN if FULL else PLANS[name]


@dataclass(frozen=True)
class Tolerance:
    """Bounds on one export's logits against PyTorch's, relative to the spread of the reference
    (random-weight logits have no structure, so top-1 agreement says little; correlation does)."""

    max_rel: float  # max |logit diff| / std(reference logits)
    min_corr: float  # lowest Pearson correlation of one position's logits with the reference's


TOLERANCES = {
    "fp32": Tolerance(1e-3, 0.999999),
    "f32": Tolerance(0.01, 0.99999),  # llama.cpp's f32 matmuls round activations
    "fp16": Tolerance(0.02, 0.9999),
    "f16": Tolerance(0.03, 0.9999),
    "bf16": Tolerance(0.1, 0.999),
    "int8": Tolerance(0.4, 0.998),
    "q8_0": Tolerance(0.4, 0.998),
    "q6_k": Tolerance(0.5, 0.995),
    "q5_0": Tolerance(1.5, 0.98),
    "q5_1": Tolerance(1.5, 0.98),
    "q5_k_m": Tolerance(1.5, 0.98),
    "q4_k_m": Tolerance(2.0, 0.95),
    "int4": Tolerance(3.0, 0.9),
    "q4_0": Tolerance(3.0, 0.9),
    "q4_1": Tolerance(3.0, 0.9),
}


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |diff| / std(ref), lowest per-position correlation)."""
    rel = float(np.abs(ours - ref).max() / ref.std())
    corr = min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, ref))
    return rel, corr


# --- one shape's pipeline: model dir -> train -> bundles -> PyTorch references ---------------


@dataclass
class ShapeRun:
    shape: RealShape
    model_dir: Path
    adapter_path: Path
    train_summary: dict
    bundles: dict[str, Path]  # ONNX variant -> bundle (the "fast" one also holds the GGUF files)
    ids: list[int]
    ref_base: np.ndarray
    ref_adapted: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    def bundle_for(self, backend: str, variant: str | None) -> Path:
        return self.bundles[variant if backend == "onnx" else "fast"]


def write_training_data(path: Path) -> Path:
    from tiny_models import _CORPUS

    lines = sorted(set(_CORPUS))
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in lines * 2))
    return path


def train_adapter(model_dir: Path, root: Path) -> tuple[Path, dict]:
    """Two AdamW steps at a short sequence length and a learning rate high enough that so few steps
    move the logits by several standard deviations (a comparison the adapter must pass, not noise)."""
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.trainer import train

    out = root / "adapter.safetensors"
    cfg = TrainConfig(
        model=str(model_dir),
        data=str(write_training_data(root / "train.jsonl")),
        out=str(out),
        seq_len=16,
        batch_size=2,
        steps=2,
        rank=4,
        alpha=8.0,
        lr=5e-3,
        eval_split=0.0,
        device="cpu",
        progress=False,
    )
    return out, train(cfg)


def probe_ids(md: ModelDir) -> list[int]:
    """Tokens the tokenizer makes, then ids from the whole vocabulary (bos/eos and the last row)."""
    from tokenizers import Tokenizer

    c = md.config
    text_ids = (
        Tokenizer.from_file(str(md.tokenizer_path)).encode("SELECT name FROM users WHERE id = 42;").ids[:8]
    )
    extra = [c.vocab_size - 1, c.bos_token_id, *c.eos_token_id[:1]]
    extra += [int(i) for i in np.random.default_rng(0).integers(0, c.vocab_size, 3)]
    return text_ids + [int(i) for i in extra if i is not None]


def reference_logits(model_dir: Path, ids: list[int], adapter: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """Our PyTorch model's logits without and with the adapter (one load: the large shapes are big)."""
    import torch

    from edge_lora.train.lora import load_adapter_into
    from edge_lora.train.model import CausalLM

    model = CausalLM.from_model_dir(model_dir).eval()
    with torch.no_grad():
        base = model(torch.tensor([ids]))[0].numpy()
        load_adapter_into(model, adapter)
        adapted = model(torch.tensor([ids]))[0].numpy()
    return base, adapted


def export_bundles(model_dir: Path, adapter_path: Path, root: Path, plan: ShapePlan) -> dict[str, Path]:
    """One bundle per ONNX graph variant through the real bundle writer; GGUF goes with the first."""
    bundles = {}
    variants = [v for v in onnx_names.VARIANTS if any(pv == v for _, pv in plan.onnx)] or ["fast"]
    for i, variant in enumerate(variants):
        onnx_quants = [q for q, v in plan.onnx if v == variant]
        backends = (["onnx"] if onnx_quants else []) + (["gguf"] if i == 0 and plan.gguf else [])
        options = ExportOptions(
            backends=backends,
            onnx_quants=onnx_quants or ["fp32"],
            onnx_variant=variant,
            gguf_quants=list(plan.gguf) if i == 0 else [],
        )
        bundles[variant] = export_bundle(
            model_dir,
            root / f"bundle-{variant}",
            [AdapterSource(adapter_path, ADAPTER)],
            options,
            show_progress=False,
        )
    bundles.setdefault("fast", bundles[variants[0]])
    return bundles


def run_shape(shape: RealShape, root: Path) -> ShapeRun:
    seconds = {}
    t = time.perf_counter()
    model_dir = make_real_model_dir(root / "model", shape)
    seconds["build"] = time.perf_counter() - t
    t = time.perf_counter()
    adapter_path, summary = train_adapter(model_dir, root)
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    bundles = export_bundles(model_dir, adapter_path, root, plan_for(shape.name))
    seconds["export"] = time.perf_counter() - t
    t = time.perf_counter()
    md = ModelDir(model_dir)
    ids = probe_ids(md)
    base, adapted = reference_logits(model_dir, ids, Adapter.load(adapter_path, base=md.config))
    seconds["reference"] = time.perf_counter() - t
    return ShapeRun(shape, model_dir, adapter_path, summary, bundles, ids, base, adapted, seconds)


class ShapeRuns:
    """One shape's run at a time: building the next one removes the previous one's files, so the
    disk and memory a 0.5B-parameter shape takes are not held for the rest of the module."""

    def __init__(self, root: Path):
        self.root, self.current = root, None

    def get(self, name: str) -> ShapeRun:
        if self.current is None or self.current.shape.name != name:
            if self.current is not None:
                shutil.rmtree(self.current.model_dir.parent, ignore_errors=True)
                self.current = None
            self.current = run_shape(SHAPES[name], self.root / name)
            print(f"\n{name}: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.current.seconds.items()))
        return self.current


@pytest.fixture(scope="module")
def shape_runs(tmp_path_factory):
    runs = ShapeRuns(tmp_path_factory.mktemp("real-shapes"))
    yield runs
    if runs.current is not None:
        shutil.rmtree(runs.current.model_dir.parent, ignore_errors=True)


# --- the checks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One check on one shape. All cases of a shape run one after another (one test function,
    parametrized in shape order), so each shape's run is built once and dropped before the next."""

    shape: str
    check: str
    backend: str | None = None
    quant: str | None = None
    variant: str | None = None

    def __str__(self) -> str:
        return "-".join(p for p in (self.shape, self.check, self.backend, self.quant, self.variant) if p)


def all_cases() -> list[Case]:
    cases = []
    for name in SHAPES:
        plan = plan_for(name)
        cases.append(Case(name, "published-and-trained"))
        cases += [Case(name, "logits", "onnx", q, v) for q, v in plan.onnx]
        cases += [Case(name, "logits", "llamacpp", q) for q in plan.gguf]
        cases += [Case(name, "k-quant-fallback", "llamacpp", q) for q in plan.gguf if q in K_FALLBACK]
        if name == MERGE_SHAPE:
            cases += [
                Case(name, "merge", b, q, v)
                for b, q, v in MERGE_CASES
                if (b == "onnx" and (q, v) in plan.onnx) or (b == "llamacpp" and q in plan.gguf)
            ]
    return [
        pytest.param(
            c, id=str(c), marks=[LOSSY_4BIT_MERGE] if c.check == "merge" and c.quant == "int4" else []
        )
        for c in cases
    ]


@pytest.mark.parametrize("case", all_cases())
def test_real_shape(shape_runs, case):
    CHECKS[case.check](shape_runs.get(case.shape), case)


def check_published_and_trained(run: ShapeRun, case: Case) -> None:
    """The model dir has the published shapes, and two training steps moved every adapter matrix."""
    c, published = ModelDir(run.model_dir).config, run.shape.published
    heads = published["num_attention_heads"]
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (
        published["vocab_size"],
        published["hidden_size"],
        published["intermediate_size"],
    )
    assert (c.num_attention_heads, c.num_key_value_heads) == (heads, published["num_key_value_heads"])
    assert c.head_dim == published.get("head_dim", published["hidden_size"] // heads)
    assert c.tie_word_embeddings == run.shape.tied and c.num_hidden_layers == run.shape.layers
    assert (
        c.rope_theta == published["rope_theta"]
        and c.max_position_embeddings == published["max_position_embeddings"]
    )
    assert (c.rope_scaling or {}).get("factor") == (published.get("rope_scaling") or {}).get("factor")
    assert run.train_summary["steps"] == 2
    adapter = Adapter.load(run.adapter_path, base=c)
    assert len(adapter.modules) == 7 * c.num_hidden_layers  # all-linear: q k v o gate up down
    assert all(np.abs(w.b).max() > 0 for w in adapter.modules.values())  # two steps moved every B off zero


def load_engine(run: ShapeRun, case: Case):
    import runtime

    options = {"quant": case.quant, **({"variant": case.variant} if case.variant else {})}
    engine = runtime.load(run.bundle_for(case.backend, case.variant), backend=case.backend, **options)
    engine.add_adapter(ADAPTER)
    return engine


def check_logits(run: ShapeRun, case: Case) -> None:
    """The runtime's logits, base and with the trained adapter, against PyTorch's."""
    engine = load_engine(run, case)
    base = engine.logits(run.ids, adapters={})
    adapted = engine.logits(run.ids, adapters={ADAPTER: 1.0})
    tol = TOLERANCES[case.quant]
    base_rel, base_corr = compare(base, run.ref_base)
    adapted_rel, adapted_corr = compare(adapted, run.ref_adapted)
    effect = float(np.abs(run.ref_adapted - run.ref_base).max() / run.ref_base.std())
    print(
        f"{case}: base max|diff|/std {base_rel:.4f} corr {base_corr:.6f}; "
        f"adapted {adapted_rel:.4f} corr {adapted_corr:.6f} "
        f"(the adapter moves logits by {effect:.3f} std)"
    )
    assert base.shape == run.ref_base.shape == (len(run.ids), run.shape.published["vocab_size"])
    assert base_rel < tol.max_rel and base_corr > tol.min_corr
    assert adapted_rel < tol.max_rel and adapted_corr > tol.min_corr
    if case.quant in ("fp32", "f32"):  # the adapter's effect is far above what the comparison lets through
        assert effect > 10 * tol.max_rel


def check_k_quant_fallback(run: ShapeRun, case: Case) -> None:
    """A weight whose rows (ggml's ne[0], the input width) do not fill whole 256-value super-blocks
    gets llama.cpp's fallback type; the others keep K-quant types."""
    import gguf

    reader = gguf.GGUFReader(run.bundles["fast"] / f"gguf/model-{case.quant}.gguf")
    weights = {t.name: (int(t.shape[0]), t.tensor_type.name) for t in reader.tensors if len(t.shape) == 2}
    print(f"{case}: " + ", ".join(f"{n}[{row}]={kind}" for n, (row, kind) in sorted(weights.items())))
    for tensor, (row, kind) in weights.items():
        if row % K_BLOCK:
            assert not kind.endswith("_K"), f"{tensor}: row {row} cannot hold {kind}"
    hidden = ModelDir(run.model_dir).config.hidden_size
    assert weights["blk.0.attn_q.weight"][1] == (
        K_FALLBACK[case.quant] if hidden % K_BLOCK else K_TYPES[case.quant]
    )
    assert any(
        kind.endswith("_K") for _, kind in weights.values()
    )  # ffn_down's rows (intermediate) fill super-blocks


def check_merge(run: ShapeRun, case: Case) -> None:
    """Merging the trained adapter into quantized weights at this width (dequantize, add, requantize)
    gives what the unmerged adapter gives, within the quantization's tolerance (8-bit; see
    LOSSY_4BIT_MERGE for 4-bit)."""
    engine = load_engine(run, case)
    unmerged = engine.logits(run.ids, adapters={ADAPTER: 1.0})
    engine.merge(ADAPTER, 1.0)
    merged = engine.logits(run.ids, adapters={})
    rel, corr = compare(merged, unmerged)
    print(f"{case}: merged vs unmerged max|diff|/std {rel:.4f} corr {corr:.6f}")
    tol = TOLERANCES[case.quant]
    assert rel < tol.max_rel and corr > tol.min_corr


CHECKS = {
    "published-and-trained": check_published_and_trained,
    "logits": check_logits,
    "k-quant-fallback": check_k_quant_fallback,
    "merge": check_merge,
}
