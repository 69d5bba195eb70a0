"""What one run measures: sizes per mode and the engine workers per model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from benchmarks.models import BenchModel
from benchmarks.pool import Worker


@dataclass
class Plan:
    quick: bool
    shapes: list[str]
    onnx_quants: list[str]
    gguf_quants: list[str]
    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    prompt: int = 128
    new_tokens: int = 64
    hf_new_tokens: int = 16  # eager fp32 PyTorch is slow: fewer steps, same per-step rate
    rounds: int = 5
    swaps: int = 200
    merged: bool = True
    train: bool = True
    scaling: bool = True
    gpu: bool = True  # GPU rows on the first shape, when a GPU device is present (benchmarks.gpu_bench)
    quality: bool = True  # the real-model quality rows (benchmarks.quality_bench)
    native: bool = True  # the C library's rows on the SmolLM2 shape's bundle (benchmarks.native_bench)
    # its goals (0.98x, 1.0x) are tighter than one run's spread: 16 rounds spread 0.94-0.98, 30 gave 1.01
    native_rounds: int = 30
    # the multi-adapter workload (benchmarks.workload_bench): one system prompt, three adapters taking turns
    workload: bool = True
    workload_system: int = 512
    workload_requests: int = 12
    workload_new_tokens: int = 64
    workload_rounds: int = 3

    @classmethod
    def make(cls, quick: bool, shapes: list[str] | None = None) -> Plan:
        if quick:
            return cls(
                True,
                shapes or ["smollm2-135m"],
                ["int4"],
                ["q4_0"],
                prompt=32,
                new_tokens=24,
                hf_new_tokens=4,
                rounds=3,
                swaps=20,
                merged=False,
                workload_system=128,
                workload_requests=6,
                workload_new_tokens=16,
                workload_rounds=2,
                native_rounds=3,
            )
        return cls(
            False,
            shapes or ["smollm2-135m", "qwen2.5-0.5b"],
            ["int4", "int8"],
            ["q4_0", "q8_0"],
            prompt=64,
            new_tokens=32,
            hf_new_tokens=8,
            rounds=7,
            swaps=30,
        )  # this VM swings 20% within seconds: more rounds

    def for_shape(self, shape: str) -> Plan:
        """The larger shape runs 4-bit only, without merged engines: on 2 shared cores its rounds take
        minutes."""
        from dataclasses import replace

        if self.quick or shape == self.shapes[0]:
            return self
        return replace(
            self,
            onnx_quants=[q for q in self.onnx_quants if BITS[q] == 4],
            gguf_quants=[q for q in self.gguf_quants if BITS[q] == 4],
            merged=False,
            hf_new_tokens=4,
            gpu=False,
        )

    @property
    def quants(self) -> dict:
        return {"onnx": self.onnx_quants, "gguf": self.gguf_quants}


# quantization families: the ONNX and GGUF quant of the same bit width are compared with each other
BITS = {"int4": 4, "q4_0": 4, "int8": 8, "q8_0": 8}


def workers(
    plan: Plan,
    model: BenchModel,
    genai: dict,
    merged_gguf: dict,
    extra_adapter: str,
    lora_files: dict[str, str] | None = None,
) -> list[Worker]:
    """Every engine of one model, ours first; labels are "<engine> <quant>" (+ " merged"). ``lora_files``:
    {"convert f16": path, "edge-lora q8_0": path, ...}, adapter "a" as llama.cpp's convert_lora_to_gguf.py
    and our --adapter-dtype write it, each run by llama.cpp as "llama.cpp <quant> lora_path <key>"."""
    from benchmarks.models import ADAPTERS

    common = {"threads": plan.threads, "prompt": plan.prompt, "new_tokens": plan.new_tokens}
    ours = {"bundle": str(model.bundle), "adapters": list(ADAPTERS), "extra_adapter": extra_adapter, **common}
    out = _our_workers(plan, ours)
    out += _llamacpp_peers(plan, model, merged_gguf, lora_files, common)
    out += _genai_peers(plan, model, genai, common)
    out.append(
        Worker(
            "transformers+PEFT fp32",
            {
                "kind": "peer-hf",
                "hf_dir": str(model.hf_dir),
                "peft_dir": str(model.peft_dir("a")),
                **common,
                "new_tokens": plan.hf_new_tokens,
            },
            ["base", "a"],
        )
    )
    return out


def _our_workers(plan: Plan, ours: dict) -> list[Worker]:
    """edge-lora on each backend and quant (cases "base", "a", plus "ab" at 4 bits), and merged at 4 bits."""
    out = []
    for q in plan.onnx_quants:
        cases = ["base", "a", "ab"] if BITS[q] == 4 else ["base", "a"]
        out.append(
            Worker(f"edge-lora onnx {q}", {"kind": "ours-onnx", "backend": "onnx", "quant": q, **ours}, cases)
        )
        if plan.merged and BITS[q] == 4:
            out.append(
                Worker(
                    f"edge-lora onnx {q} merged",
                    {"kind": "ours-onnx", "backend": "onnx", "quant": q, "merged": True, **ours},
                    ["merged"],
                )
            )
    for q in plan.gguf_quants:
        cases = ["base", "a", "ab"] if BITS[q] == 4 else ["base", "a"]
        out.append(
            Worker(
                f"edge-lora llama.cpp {q}",
                {"kind": "ours-llamacpp", "backend": "llamacpp", "quant": q, **ours},
                cases,
            )
        )
        if plan.merged and BITS[q] == 4:
            out.append(
                Worker(
                    f"edge-lora llama.cpp {q} merged",
                    {"kind": "ours-llamacpp", "backend": "llamacpp", "quant": q, "merged": True, **ours},
                    ["merged"],
                )
            )
    return out


def _llamacpp_peers(
    plan: Plan, model: BenchModel, merged_gguf: dict, lora_files: dict[str, str] | None, common: dict
) -> list[Worker]:
    """llama.cpp on each GGUF: base; at 4 bits with our adapter file and each of ``lora_files``; merged."""
    out = []
    for q in plan.gguf_quants:
        gguf = str(model.gguf(q))
        out.append(Worker(f"llama.cpp {q}", {"kind": "peer-llamacpp", "gguf": gguf, **common}, ["base"]))
        if BITS[q] == 4:  # the adapter comparisons are made at 4 bits
            out.append(
                Worker(
                    f"llama.cpp {q} lora_path",
                    {"kind": "peer-llamacpp", "gguf": gguf, "lora": str(model.gguf_adapter("a")), **common},
                    ["a"],
                )
            )
            for key, path in (lora_files or {}).items():
                spec = {"kind": "peer-llamacpp", "gguf": gguf, "lora": str(path), **common}
                out.append(Worker(f"llama.cpp {q} lora_path {key}", spec, ["a"]))
        if q in merged_gguf:
            out.append(
                Worker(
                    f"llama.cpp {q} merged",
                    {"kind": "peer-llamacpp", "gguf": str(merged_gguf[q]), **common},
                    ["merged"],
                )
            )
    return out


def _genai_peers(plan: Plan, model: BenchModel, genai: dict, common: dict) -> list[Worker]:
    """ONNX Runtime GenAI: its own builder's folders (plain, adapter baked) and our 4-bit folders."""
    out = []
    if "plain" in genai:
        out.append(
            Worker(
                "ORT GenAI builder int4",
                {"kind": "peer-genai", "folder": str(genai["plain"]), **common},
                ["base"],
            )
        )
    if "baked" in genai:
        out.append(
            Worker(
                "ORT GenAI builder int4 +LoRA baked",
                {"kind": "peer-genai", "folder": str(genai["baked"]), **common},
                ["a"],
            )
        )
    for q in plan.onnx_quants:
        if BITS[q] == 4:  # onnxruntime-genai on our own folder, the adapter switchable through og.Adapters
            out.append(
                Worker(
                    f"ORT GenAI on our {q} +og.Adapters",
                    {
                        "kind": "peer-genai",
                        "folder": str(model.onnx_folder(q)),
                        "adapter": str(model.onnx_adapter("a")),
                        **common,
                    },
                    ["base", "a"],
                )
            )
    return out
