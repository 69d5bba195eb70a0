"""The llama.cpp backend: a bundle's GGUF model through llama-cpp-python's low-level C API.

Its entry point is :class:`runtime.llamacpp.backend.LlamaCppEngine`, which ``runtime.load(bundle,
backend="llamacpp")`` imports only when that backend is chosen; llama_cpp itself is imported lazily
(``lib.llama_cpp()``), so importing this package costs nothing. Beside the engine: the adapters and
merged variants (``adapters``), the C API's checked wrappers (``lib``, ``model``, ``context``) and
``merge`` into the base's own quantization (``merge`` with the adapter-aware rounding of ``requant``).
"""
