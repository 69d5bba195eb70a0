"""The on-device runtime: load a bundle, attach / swap / stack / merge adapters, generate.

Never imports torch or the converters: numpy, safetensors, tokenizers and one backend
(onnxruntime or llama-cpp-python), imported lazily inside the backend that needs it. Each backend
is a package of its own (``runtime.onnx``, ``runtime.llamacpp``); the engine, tokenizer, sampling
and devices they share live here.

    import runtime
    engine = runtime.load("bundle/", backend="auto")
    engine.add_adapter("sql")                       # from the bundle, hash and base checked
    engine.generate("...", adapters={"sql": 1.0})   # per-request adapter set
"""

from __future__ import annotations

import importlib.util
import os

from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from runtime.devices import DEVICES, check_device  # noqa: F401
from runtime.engine import Engine  # noqa: F401
from runtime.sampling import SamplingParams  # noqa: F401

BACKENDS = ("onnx", "llamacpp")


def available_backends(bundle: Bundle) -> list[str]:
    have = []
    if bundle.backends.get("onnx") and importlib.util.find_spec("onnxruntime"):
        have.append("onnx")
    if bundle.backends.get("gguf") and importlib.util.find_spec("llama_cpp"):
        have.append("llamacpp")
    return have


def load(bundle: str | os.PathLike | Bundle, backend: str = "auto", device: str = "cpu", **options) -> Engine:
    """Open a bundle with one backend. ``backend="auto"`` picks ONNX Runtime, then llama.cpp.

    ``device``: ``"cpu"``; ``"gpu"`` (ONNX Runtime's WebGPU provider, or llama.cpp's GPU backend
    with every layer offloaded), an error saying what is missing when there is none; ``"auto"``: a
    hardware GPU when the backend finds one, else the CPU. ``engine.info()["device"]`` says which."""
    options["device"] = check_device(device)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    if backend == "auto":
        have = available_backends(bundle)
        if not have:
            raise EdgeLoraError(
                f"no backend can run this bundle (files for: {', '.join(bundle.backends) or 'none'})",
                path=bundle.root,
                hint="pip install 'edge-lora[onnx]' or 'edge-lora[llama]'",
            )
        backend = have[0]
    if backend == "onnx":
        from runtime.onnx.backend import OnnxEngine

        return OnnxEngine(bundle, **options)
    if backend in ("llamacpp", "gguf", "llama"):
        from runtime.llamacpp.backend import LlamaCppEngine

        return LlamaCppEngine(bundle, **options)
    raise EdgeLoraError(f"unknown backend {backend!r}", hint=f"choose auto, {', '.join(BACKENDS)}")
