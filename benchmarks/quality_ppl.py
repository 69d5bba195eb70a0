"""Perplexity through the real engines, one model per process (``python -m benchmarks.quality_ppl SPEC``).

Every engine scores the same token windows (edge_lora.app.real_text) and hands back full logits; the
negative log-likelihood of each window's tokens 1..T-1 is computed here, once, in float64 numpy
(``window_nll``), so engines differ only in their logits:

hf          transformers, fp32, on the Hugging Face folder: the full-precision reference
gguf        llama.cpp (llama-cpp-python's ``Llama``, ``logits_all``, f32 KV cache) on any GGUF file
ours-onnx   our runtime's ``engine.logits`` on an exported bundle (quant and variant chosen)
ort-folder  a plain ONNX Runtime session on a folder with onnxruntime-genai's I/O names (the model
            builder's output): an empty past, every position's logits
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Sum over positions 0..T-2 of -log p(ids[t+1] | ids[:t+1]) from ``logits`` [T, vocab]."""
    x = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return float((lse - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)


def measure(spec: dict) -> dict:
    """{"ppl", "nll", "tokens", "window_nll": [...], "seconds"} of one engine on the windows (a JSON
    list of id lists) in ``spec["windows_file"]``."""
    with open(spec["windows_file"]) as f:
        windows = json.load(f)
    logits_of = ENGINES[spec["engine"]](dict(spec, n_ctx=max(len(ids) for ids in windows)))
    t0 = time.perf_counter()
    per_window = [window_nll(logits_of(ids), ids) for ids in windows]
    tokens = sum(len(ids) - 1 for ids in windows)
    nll = sum(per_window)
    return {
        "ppl": perplexity(nll, tokens),
        "nll": nll,
        "tokens": tokens,
        "window_nll": per_window,
        "seconds": time.perf_counter() - t0,
    }


def _hf(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec.get("threads", 2))
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()

    def logits(ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

    return logits


def llama_for_logits(path: str, n_ctx: int, threads: int):
    """llama-cpp-python's ``Llama`` keeping every position's logits, with an f32 KV cache (no f16
    rounding of keys and values), on the CPU alone (a GPU build would otherwise hand batches to any
    device it sees, a software Vulkan one included) with the extra buffer types as the CPU allows
    (the runtime's choice)."""
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as capi

    from runtime.llamacpp.lib import default_extra_bufts

    extra, defaults = default_extra_bufts(), capi.llama_model_default_params
    no_devices = (ctypes.c_void_p * 1)(None)  # an empty NULL-terminated device list: the CPU only

    def model_params():  # Llama() has no knob for these: set them where it reads its defaults
        params = defaults()
        params.use_extra_bufts = extra
        params.devices = ctypes.cast(no_devices, ctypes.c_void_p)
        return params

    capi.llama_model_default_params = model_params
    try:
        return llama_cpp.Llama(
            path,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            type_k=0,  # GGML_TYPE_F32
            type_v=0,
            flash_attn=False,
            verbose=False,
        )
    finally:
        capi.llama_model_default_params = defaults


def _gguf(spec: dict):
    llm = llama_for_logits(spec["path"], spec["n_ctx"], spec.get("threads", 2))

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return logits


def _ours_onnx(spec: dict):
    import runtime

    engine = runtime.load(
        spec["path"],
        backend="onnx",
        quant=spec["quant"],
        variant=spec.get("variant"),
        threads=spec.get("threads", 2),
    )
    return lambda ids: engine.logits(ids)


def _ort_folder(spec: dict):
    """A plain ONNX Runtime session on a genai-style folder (``model.onnx``): input_ids, attention_mask,
    an empty past per layer (its dtype and head shape read from the graph), position_ids if asked."""
    from pathlib import Path

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.get("threads", 2)
    session = ort.InferenceSession(str(Path(spec["path"]) / "model.onnx"), options, ["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    # the past's head count and size, from genai_config.json (the graph may name them symbolically)
    decoder = json.loads((Path(spec["path"]) / "genai_config.json").read_text())["model"]["decoder"]
    heads, dim = decoder["num_key_value_heads"], decoder["head_size"]

    def logits(ids: list[int]) -> np.ndarray:
        n = len(ids)
        feeds = {"input_ids": np.array([ids], dtype=np.int64)}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, n), dtype=np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, info in inputs.items():
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((1, heads, 0, dim), dtype=dtypes[info.type])
        return session.run(["logits"], feeds)[0][0].astype(np.float32)

    return logits


ENGINES = {"hf": _hf, "gguf": _gguf, "ours-onnx": _ours_onnx, "ort-folder": _ort_folder}


if __name__ == "__main__":  # python -m benchmarks.quality_ppl SPEC_JSON: one JSON line out
    print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
