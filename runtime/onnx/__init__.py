"""The ONNX Runtime backend: an exported decoder run through ONNX Runtime, adapters fed to its LoRA slots.

Its entry point is :class:`runtime.onnx.backend.OnnxEngine`, which ``runtime.load(bundle,
backend="onnx")`` imports only when that backend is chosen; onnxruntime itself is imported lazily
inside the modules that call it, so importing this package costs nothing. Beside the engine: the
sessions (``sessions``: the Python binding; ``cpu_sessions`` over ``ort_capi`` and ``ort_session``:
ONNX Runtime's C API, where the plain and the LoRA graph share one copy of the weights), the adapter
sets (``adapter_sets``), one request's choice and fixed facts (``request``), the per-request decode
states (``cpu_state``, ``decode_states``) and the WebGPU device (``device``).
"""
