"""K-quants through llama.cpp's own quantizer (llama-cpp-python's ``llama_model_quantize``).

llama.cpp picks each tensor's type itself (q4_k_m mixes q4_K and q6_K) and falls back per tensor
when a row does not fill whole 256-value super-blocks.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edge_lora.errors import EdgeLoraError

_quiet_callback = None  # kept alive for as long as llama.cpp holds the pointer


def llama_quantize(src: Path, dst: Path, ftype: int, verbose: bool = False) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise EdgeLoraError(
            "K-quants need llama.cpp's quantizer", hint="pip install llama-cpp-python, or choose q4_0 / q8_0"
        ) from None
    global _quiet_callback
    if not verbose and _quiet_callback is None:
        _quiet_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_quiet_callback, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(
        os.fspath(src).encode(), os.fspath(dst).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise EdgeLoraError(
            f"llama.cpp could not quantize the model (status {status})",
            path=src,
            hint="run with a numpy quant (q4_0, q8_0) or check the llama-cpp-python install",
        )
