"""What the ARM64 lane runs: the targets (family x backend x quantization) and, on each, the adapter
cases, through the runtime's public face only. Torch-free: the same code runs on the x86 host (the
reference) and on the emulated arm64 Python, and writes one ``.npz`` of logits and greedy tokens per
side plus a JSON of what the side saw (llama.cpp's build, system info and repacked tensors).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ONNX_QUANTS = ("fp32", "fp16", "int8", "int4")  # edge_lora.onnx_format.names.QUANTS
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
# Every quantization on an untied Llama-2 shape and a tied Qwen2 shape (biases); the other families
# of tests/tiny_models.py at the exact and the 4-bit ends, which keeps the lane inside CI's minutes.
FULL_FAMILIES = ("llama", "qwen2")
LIGHT_FAMILIES = ("llama3", "mistral", "smollm")
LIGHT_QUANTS = {"onnx": ("fp32", "int4"), "llamacpp": ("f32", "q4_0")}
PORTABLE_QUANTS = ("fp32", "int8", "int4")  # the standard-ops ONNX graph (NNAPI/XNNPACK path)

PROMPT = [5, 17, 42, 99, 3, 250, 12, 7, 64, 130]
NEW_TOKEN_TEXT = "SELECT <sql> id </sql>"
NEW_TOKENS = ["<sql>", "</sql>"]
GREEDY_TOKENS = 8
# (case, adapter set, greedy?) in the order they run: the swap is "b" right after "a" was active,
# "back" returns to "a" (the same side must reproduce "active" exactly), "merged" folds "a" in last.
CASES = (
    ("base", {}, True),
    ("active", {"a": 1.0}, True),
    ("swapped", {"b": 1.0}, True),
    ("stacked", {"a": 1.0, "b": 0.5}, True),
    ("back", {"a": 1.0}, False),
    ("dora", {"dora": 1.0}, True),
    ("new_tokens", {"tok": 1.0}, True),
)
ADAPTERS = ("a", "b", "dora", "tok")


@dataclass(frozen=True)
class Target:
    family: str
    backend: str  # "onnx" | "llamacpp"
    quant: str
    variant: str = ""  # ONNX: "fast" | "portable"; llama.cpp: "" or "norepack" (use_extra_bufts off)

    @property
    def key(self) -> str:
        return "/".join(p for p in (self.family, self.backend, self.quant, self.variant) if p)

    @property
    def bundle(self) -> str:
        return f"{self.family}-portable" if self.variant == "portable" else self.family


def targets(families: tuple[str, ...] = FULL_FAMILIES + LIGHT_FAMILIES) -> list[Target]:
    out = []
    for family in families:
        full = family in FULL_FAMILIES
        out += [Target(family, "onnx", q, "fast") for q in (ONNX_QUANTS if full else LIGHT_QUANTS["onnx"])]
        if full:
            out += [Target(family, "onnx", q, "portable") for q in PORTABLE_QUANTS]
        out += [Target(family, "llamacpp", q) for q in (GGUF_QUANTS if full else LIGHT_QUANTS["llamacpp"])]
    # the repacked q4_0 path against the same core without repacking (ARM: q4_0_4x4 vs plain q4_0)
    out.append(Target(FULL_FAMILIES[0], "llamacpp", "q4_0", "norepack"))
    return out


@dataclass
class Perturb:
    """A deliberately wrong setting (EDGE_LORA_ARM64_PERTURB), to show the lane fails when a result
    leaves its tolerance: ``kv-f16`` runs llama.cpp with its f16 KV cache and flash attention
    (precise=False) on the side that sets it, so the exact quantizations drift by ~1e-3."""

    name: str = ""

    @classmethod
    def from_env(cls) -> Perturb:
        name = os.environ.get("EDGE_LORA_ARM64_PERTURB", "")
        if name not in ("", "kv-f16"):
            raise SystemExit(f"EDGE_LORA_ARM64_PERTURB={name!r}: the only perturbation is 'kv-f16'")
        return cls(name)


class LlamaLog:
    """llama.cpp's log captured (system info and the 'repack tensor ... with q4_0_4x4' lines)."""

    def __init__(self) -> None:
        import llama_cpp

        self.lines: list[str] = []
        self._cb = llama_cpp.llama_log_callback(lambda level, text, user: self.lines.append(text.decode()))
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))

    def repacked(self) -> list[str]:
        """The layouts llama.cpp repacked weights into, e.g. ['q4_0_4x4', 'q8_0_4x4']."""
        kinds = {line.rsplit(" with ", 1)[1].strip() for line in self.lines if "repack tensor" in line}
        return sorted(kinds)


def _engine(runtime, bundle: Path, target: Target, perturb: Perturb):
    if target.backend == "onnx":
        return runtime.load(bundle, backend="onnx", quant=target.quant, variant=target.variant, threads=1)
    return runtime.load(
        bundle,
        backend="llamacpp",
        quant=target.quant,
        threads=1,
        precise=perturb.name != "kv-f16",  # f32 KV, no flash attention: comparable to 1e-5
        use_extra_bufts=False if target.variant == "norepack" else None,  # None: llama.cpp's choice here
        verbose=True,  # its log goes to LlamaLog, which records the repacking
        n_ctx=128,
    )


def run_target(runtime, bundles: Path, target: Target, perturb: Perturb) -> dict[str, np.ndarray]:
    """Every case on one target: ``{case/logits, case/tokens, ...}``."""
    engine = _engine(runtime, bundles / target.bundle, target, perturb)
    from runtime.sampling import SamplingParams

    for name in ADAPTERS:
        engine.add_adapter(name)
    greedy = SamplingParams(max_new_tokens=GREEDY_TOKENS)
    out: dict[str, np.ndarray] = {}
    for case, chosen, generate in CASES:
        ids = PROMPT
        if case == "new_tokens":
            ids = engine.tokenizer_for(chosen).encode(NEW_TOKEN_TEXT)
            out[f"{case}/ids"] = np.asarray(ids, np.int64)
        out[f"{case}/logits"] = np.asarray(engine.logits(ids, adapters=chosen), np.float32)
        if generate:
            out[f"{case}/tokens"] = np.asarray(engine.generate_ids(ids, greedy, adapters=chosen), np.int64)
    engine.merge("a")  # folded into the weights: base requests now compute what "active" did
    out["merged/logits"] = np.asarray(engine.logits(PROMPT, adapters={}), np.float32)
    return out


def run_all(bundles: Path, out: Path, chosen: list[Target], side: dict) -> None:
    """Run ``chosen`` and write ``out`` (.npz) and ``out`` with .json (``side``: what ran where)."""
    import runtime

    perturb = Perturb.from_env()
    log = LlamaLog() if any(t.backend == "llamacpp" for t in chosen) else None
    arrays: dict[str, np.ndarray] = {}
    repacked: dict[str, list[str]] = {}
    start = time.perf_counter()
    for target in chosen:
        t0 = time.perf_counter()
        if log:
            log.lines.clear()
        for k, v in run_target(runtime, bundles, target, perturb).items():
            arrays[f"{target.key}/{k}"] = v
        if log and target.backend == "llamacpp":
            repacked[target.key] = log.repacked()
        print(f"  {target.key}: {time.perf_counter() - t0:.1f} s", flush=True)
    side.update(
        seconds=round(time.perf_counter() - start, 1),
        targets=[asdict(t) for t in chosen],
        repacked=repacked,
        perturb=perturb.name,
    )
    if log:
        import llama_cpp

        side["llama_system_info"] = llama_cpp.llama_print_system_info().decode()
    np.savez(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps(side, indent=1))
