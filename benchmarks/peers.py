"""The peers, measured by the runner itself in the same run: llama.cpp, ONNX Runtime GenAI,
transformers + PEFT.

llama.cpp       llama-cpp-python's own ``Llama`` on the bundle's GGUF files: no adapter; ``lora_path=``
                (llama_set_adapters_lora, unmerged); and a merged GGUF. Its fastest safe settings:
                flash attention on, and the extra (repacking) buffer types wherever the CPU allows
                (off on Intel AMX, where they crashed; see DESIGN.md). Greedy sampling in C. Its own
                adapter files too: adapter "a" through llama.cpp's convert_lora_to_gguf.py at f32, f16
                and q8_0 (``peer_lora_ggufs``), and ours by --adapter-dtype (``our_lora_ggufs``).
ORT GenAI       its own model builder on the same Hugging Face directory (``-p int4 -e cpu``), plain
                and with ``adapter_path=`` (LoRA baked in as constant MatMuls, fused QKV split), run
                through onnxruntime_genai; and our exported folder with a switchable ``.onnx_adapter``
                through ``og.Adapters`` (LoRA as inputs).
transformers    eager PyTorch fp32, ``PeftModel`` unmerged: the floor for decode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make(spec: dict):
    kinds = {"peer-llamacpp": LlamaCppPeer, "peer-genai": GenAIPeer, "peer-hf": HFPeer}
    return kinds[spec["kind"]](spec)


# --- llama.cpp ------------------------------------------------------------------------


class LlamaCppPeer:
    def __init__(self, spec: dict):
        import llama_cpp
        import llama_cpp.llama_cpp as capi  # the module Llama() reads its defaults from

        from runtime.llamacpp.lib import default_extra_bufts

        extra = default_extra_bufts()
        defaults = capi.llama_model_default_params

        # Llama() has no knob for the extra buffer types: set them where it reads its defaults
        def model_params():
            params = defaults()
            params.use_extra_bufts = extra
            return params

        capi.llama_model_default_params = model_params
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(
            spec["gguf"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            n_ctx=spec.get("n_ctx", 2048),
            n_batch=512,
            flash_attn=True,
            lora_path=spec.get("lora"),
            verbose=False,
        )
        self.load_s = time.perf_counter() - t0
        self.use_extra_bufts = extra

    def decode(self, case: str, prompt: list[int], new_tokens: int) -> dict:
        self.llm.reset()
        stream = self.llm.generate(
            prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        )
        t0 = time.perf_counter()
        next(stream)  # prefill + the first token
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            next(stream)
        rate = new_tokens / (time.perf_counter() - t1)
        stream.close()
        return {"tok_s": rate, "prefill_ms": (t1 - t0) * 1e3}


def merged_gguf(model, quant: str) -> Path:
    """The bundle's GGUF with adapter "a" merged (dequantize, add, requantize), cached: the merged peer's
    file."""
    from edge_lora.adapter import Adapter
    from edge_lora.bundle import Bundle
    from edge_lora.gguf_format.merge import write_merged_gguf

    out = model.root / "peers" / f"merged-a-{quant}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        bundle = Bundle.open(model.bundle)
        adapter = Adapter.load(
            model.adapter_file("a"), base=bundle.config, base_fingerprint=bundle.base_fingerprint
        )
        write_merged_gguf(model.gguf(quant), out, bundle.config, adapter, 1.0)
    return out


# what llama.cpp's convert_lora_to_gguf.py --outtype writes (and our --adapter-dtype)
LORA_DTYPES = ("f32", "f16", "q8_0")


def convert_lora_script(say=print) -> Path | None:
    """llama.cpp's own ``convert_lora_to_gguf.py``: ``$EDGE_LORA_CONVERT_LORA``, else the llama-cpp-python
    source tree (``vendor/llama.cpp``, it needs its sibling modules) unpacked under the temp dir or pip's
    cache, else the installed llama-cpp-python's source package fetched through pip's own configuration
    and its conversion scripts unpacked into the benchmark cache (once)."""
    import glob
    import tempfile

    if os.environ.get("EDGE_LORA_CONVERT_LORA"):
        return Path(os.environ["EDGE_LORA_CONVERT_LORA"])
    roots = [tempfile.gettempdir(), str(Path.home() / ".cache" / "pip")]
    for root in roots:
        for depth in ("*", "*/*", "*/*/*"):
            found = sorted(glob.glob(f"{root}/{depth}/vendor/llama.cpp/convert_lora_to_gguf.py"))
            if found:
                return Path(found[-1])
    return _unpacked_convert_scripts(say)


def _unpacked_convert_scripts(say=print) -> Path | None:
    """The installed llama-cpp-python's ``vendor/llama.cpp`` Python files (the convert scripts,
    ``conversion/``, ``gguf-py/``), unpacked under the benchmark cache once."""
    from importlib.metadata import PackageNotFoundError

    from benchmarks.llama_cpp_source import installed_version, unpack_vendor
    from benchmarks.models import cache_root

    try:
        dest = cache_root() / "llama.cpp-scripts" / installed_version()
    except PackageNotFoundError:
        return None
    if not (dest / ".complete").is_file():
        say("[peers] fetching llama-cpp-python's source package for convert_lora_to_gguf.py")
    try:
        unpack_vendor(
            dest, "", lambda rel: len(rel) <= 4 and (rel[-1].endswith(".py") or rel[0] == "gguf-py"), 300
        )
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        say(f"[peers] {str(err).splitlines()[0]}")
        return None
    script = dest / "convert_lora_to_gguf.py"
    return script if script.is_file() else None


def peer_lora_ggufs(model, say=print) -> dict[str, Path]:
    """Adapter "a" (its PEFT directory) through llama.cpp's convert_lora_to_gguf.py at f32, f16 and q8_0,
    cached: the peer's own adapter files. {} when the script is not on this machine."""
    script = convert_lora_script(say)
    if script is None:
        say(
            "[peers] llama.cpp's convert_lora_to_gguf.py not found (set EDGE_LORA_CONVERT_LORA): "
            "no peer adapter files"
        )
        return {}
    out = {}
    for dtype in LORA_DTYPES:
        path = model.root / "peers" / f"convert-lora-a-{dtype}.gguf"
        if not path.is_file():
            say(f"[peers] {model.shape}: convert_lora_to_gguf.py --outtype {dtype}")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            cmd = [
                sys.executable,
                str(script),
                str(model.peft_dir("a")),
                "--base",
                str(model.hf_dir),
                "--outtype",
                dtype,
                "--outfile",
                str(tmp),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not tmp.is_file():
                raise RuntimeError(f"convert_lora_to_gguf.py failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
            os.replace(tmp, path)
        out[dtype] = path
    return out


def our_lora_ggufs(model) -> dict[str, Path]:
    """Adapter "a" as `edge-lora export --adapter-dtype fp32|fp16|int8` writes its GGUF (f32, f16, q8_0),
    cached per exporter version: our files in llama.cpp's own runtime, beside the peer's."""
    from benchmarks.models import exporters_digest
    from edge_lora.adapter import Adapter
    from edge_lora.adapter_dtype import GGUF_DTYPE, rounded
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
    from edge_lora.model_dir import ModelDir

    config = ModelDir(model.hf_dir).config
    out = {}
    for dtype, gguf_dtype in GGUF_DTYPE.items():
        path = model.root / "peers" / f"edge-lora-a-{gguf_dtype}-{exporters_digest()}.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            adapter = rounded(Adapter.load(model.adapter_file("a"), base=config), dtype)
            export_gguf_adapter(adapter, config, path, dtype=gguf_dtype)
        out[gguf_dtype] = path
    return out


# --- ONNX Runtime GenAI ---------------------------------------------------------------


def build_genai(model, with_adapter: bool, say=print) -> Path:
    """ORT GenAI's model builder on the Hugging Face directory (int4, CPU), cached per model."""
    out = model.root / "peers" / ("genai-int4-lora-a" if with_adapter else "genai-int4")
    stamp = out / ".built"
    if stamp.is_file():
        return out
    say(
        f"[peers] {model.shape}: onnxruntime_genai model builder int4{' + adapter a' if with_adapter else ''}"
    )
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model.hf_dir),
        "-o",
        str(out),
        "-p",
        "int4",
        "-e",
        "cpu",
        "-c",
        str(model.root / "peers" / "hf-cache"),
    ]
    if with_adapter:
        cmd += ["--extra_options", f"adapter_path={model.peft_dir('a')}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(
            f"the onnxruntime_genai model builder failed:\n{(proc.stderr or proc.stdout)[-2000:]}"
        )
    stamp.write_text("ok\n")
    return out


def genai_timed(gen, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tok/s) of an onnxruntime-genai generator, counted as ours and
    llama.cpp's are: ``new_tokens`` model runs. ``append_tokens`` runs the prompt; the first
    ``generate_next_token`` only picks a token from its logits (~0.15 ms, no run), so it goes with the
    prefill, as llama.cpp's first token does; each later call runs the model once. (Timing that first
    pick with the decode counted 31 runs as 32 tokens: GenAI's rate 3% too high.)"""
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        gen.generate_next_token()
    return t1 - t0, new_tokens / (time.perf_counter() - t1)


class GenAIPeer:
    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        self.og = og
        t0 = time.perf_counter()
        config = og.Config(spec["folder"])
        config.clear_providers()
        threads = {"intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.adapters = None
        if spec.get("adapter"):
            self.adapters = og.Adapters(self.model)
            self.adapters.load(spec["adapter"], "a")
        self.load_s = time.perf_counter() - t0

    def decode(self, case: str, prompt: list[int], new_tokens: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens + 1
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        if self.adapters is not None and case == "a":
            gen.set_active_adapter(self.adapters, "a")
        prefill, rate = genai_timed(gen, prompt, new_tokens)
        del gen
        return {"tok_s": rate, "prefill_ms": prefill * 1e3}

    def extras(self, swaps: int) -> dict:
        """The switchable adapter: first step after set_active_adapter on a fresh generator vs the next."""
        og, first, steady = self.og, [], []
        if self.adapters is None:
            return {}
        for _ in range(swaps):
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=32, min_length=32, do_sample=False)
            gen = og.Generator(self.model, params)
            gen.set_active_adapter(self.adapters, "a")
            gen.append_tokens([5, 6, 7, 8, 9, 10, 11, 12])
            # picks from the prompt's logits: the next call is the first decode step
            gen.generate_next_token()
            t0 = time.perf_counter()
            gen.generate_next_token()
            first.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            gen.generate_next_token()
            steady.append(time.perf_counter() - t1)
            del gen
        return {
            "first_step_after_swap_ms": float(np.median(first)) * 1e3,
            "steady_step_ms": float(np.median(steady)) * 1e3,
            "first_over_steady": float(np.median(np.array(first) / np.array(steady))),
        }


# --- transformers + PEFT --------------------------------------------------------------


class HFPeer:
    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa"
        )
        if spec.get("peft_dir"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec["peft_dir"])
        self.model = model.eval()
        self.load_s = time.perf_counter() - t0

    def decode(self, case: str, prompt: list[int], new_tokens: int) -> dict:
        import contextlib

        torch = self.torch
        off = (
            self.model.disable_adapter()
            if case == "base" and hasattr(self.model, "disable_adapter")
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), off:
            t0 = time.perf_counter()
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            t1 = time.perf_counter()
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            for _ in range(new_tokens):
                out = self.model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax()
            rate = new_tokens / (time.perf_counter() - t1)
        return {"tok_s": rate, "prefill_ms": (t1 - t0) * 1e3}
