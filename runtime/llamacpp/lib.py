"""llama-cpp-python's library and the plain C calls around it: loading it (once per process), its
log, the hardware it sees (Intel AMX, ggml's GPU devices) and its tokenizer on a GGUF's vocabulary.

Every C call that can fail is checked here and in :mod:`runtime.llamacpp.model` (a loaded model
and its adapters) and :mod:`runtime.llamacpp.context` (a context: KV cache, batches, logits):
NULL pointers and non-zero status become an ``EdgeLoraError`` naming the file and what to do;
nothing above these modules touches ctypes. Not thread-safe: the engine serialises all calls on
one context with a lock.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from edge_lora.errors import EdgeLoraError
from runtime.devices import CPU, Device, is_software

_state = {"backend": False, "quiet": None, "ggml": None}
GPU_TYPES = (1, 2)  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU


def llama_cpp() -> ModuleType:
    try:
        import llama_cpp as lib
    except ImportError:
        raise EdgeLoraError(
            "the llama.cpp backend needs llama-cpp-python", hint="pip install 'edge-lora[llama]'"
        ) from None
    if not _state["backend"]:
        lib.llama_backend_init()
        _state["backend"] = True
    return lib


def silence_log(verbose: bool) -> None:
    """llama.cpp logs every load to stderr; keep quiet unless asked (the callback must stay alive)."""
    lib = llama_cpp()
    if verbose:
        if _state["quiet"] is not None:
            lib.llama_log_set(ctypes.cast(None, lib.llama_log_callback), ctypes.c_void_p(0))  # back to stderr
            _state["quiet"] = None
    elif _state["quiet"] is None:
        _state["quiet"] = lib.llama_log_callback(lambda level, text, user_data: None)
        lib.llama_log_set(_state["quiet"], ctypes.c_void_p(0))


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Intel AMX: llama.cpp's AMX buffer type crashed decoding Q8_0/Q4_0 here, so repacking goes off."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def default_extra_bufts() -> bool:
    return not cpu_has_amx()


def _ggml() -> ctypes.CDLL:
    """ggml's backend registry (ggml-backend.h), through the library llama-cpp-python ships."""
    if _state["ggml"] is None:
        llama_cpp()
        from llama_cpp._ggml import libggml as ggml

        ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        for fn in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_type.restype = ctypes.c_int
        _state["ggml"] = ggml
    return _state["ggml"]


@dataclass(frozen=True)
class GpuDevice:
    ptr: int  # ggml_backend_dev_t
    name: str  # "Vulkan0", "Metal", "CUDA0"
    description: str  # the driver's name for it, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"


def gpu_backends() -> list[str]:
    """The GPU backends this llama-cpp-python was built with (``Vulkan``, ``Metal``, ``CUDA``, ...)."""
    ggml = _ggml()
    names = [
        ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
        for i in range(ggml.ggml_backend_reg_count())
    ]
    return [n for n in names if n not in ("CPU", "BLAS", "RPC")]


def gpu_devices() -> list[GpuDevice]:
    """The GPU devices llama.cpp sees (Vulkan lists a software device such as Mesa's lavapipe only
    when ``GGML_VK_VISIBLE_DEVICES`` names it)."""
    ggml = _ggml()
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) in GPU_TYPES:
            found.append(
                GpuDevice(
                    dev,
                    ggml.ggml_backend_dev_name(dev).decode(),
                    ggml.ggml_backend_dev_description(dev).decode(),
                )
            )
    return found


NO_GPU_BUILD = (
    "this llama-cpp-python was built without a GPU backend: reinstall it with "
    'CMAKE_ARGS="-DGGML_VULKAN=on" (or -DGGML_METAL=on, -DGGML_CUDA=on) '
    "pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python; "
    "scripts/software-gpu.sh builds and caches the Vulkan one"
)
NO_GPU_DEVICE = (
    "llama.cpp's {backends} backend found no GPU device: install the GPU's driver "
    "(Vulkan: Mesa or the vendor's); "
    "a software device such as Mesa's lavapipe is listed only when GGML_VK_VISIBLE_DEVICES names it"
)


def find_gpu(want: str) -> tuple[Device, list[GpuDevice]]:
    """The device for ``want`` ("gpu" or "auto"): ``(Device, [GpuDevice])`` to offload to, or
    ``(CPU, [])`` when ``auto`` finds no hardware GPU. ``gpu`` without one raises, saying what is missing."""
    found = gpu_devices()
    if want == "auto":
        found = [d for d in found if not is_software(d.description)]
    if not found:
        if want == "gpu":
            backends = gpu_backends()
            reason = NO_GPU_DEVICE.format(backends="/".join(backends)) if backends else NO_GPU_BUILD
            raise EdgeLoraError(f"device='gpu': {reason}", hint="or run on device='cpu'")
        return CPU, []
    first = found[0]
    return Device("gpu", f"{first.name} ({first.description})", software=is_software(first.description)), [
        first
    ]


# --- llama.cpp's own tokenizer on a GGUF's vocabulary ------------------------------------------------


def tokenize_with_gguf(
    gguf_path: str | os.PathLike, texts: list[str], *, add_special: bool = False, parse_special: bool = False
) -> list[list[int]]:
    """Token ids from llama.cpp's tokenizer on a GGUF (loaded vocab-only), as its test-tokenizer-0 does."""
    with _llama_cpp_vocab(gguf_path) as (lib, vocab):
        return [_tokenize(lib, vocab, text, add_special, parse_special) for text in texts]


@contextmanager
def _llama_cpp_vocab(gguf_path: str | os.PathLike) -> Iterator[tuple[ModuleType, object]]:
    silence_log(False)
    lib = llama_cpp()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(os.fspath(gguf_path).encode(), params)
    if not model:  # a NULL pointer, not None
        raise EdgeLoraError(
            "llama.cpp could not load this GGUF's vocabulary",
            path=gguf_path,
            hint="re-export the model; the file may be truncated",
        )
    try:
        yield lib, lib.llama_model_get_vocab(model)
    finally:
        lib.llama_model_free(model)


def _tokenize(lib: ModuleType, vocab: object, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    room = len(data) + 8  # at most one token per byte, plus a space prefix and BOS/EOS
    while True:
        buf = (lib.llama_token * room)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, room, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        if -n <= room:  # llama.cpp's overflow code, not a size
            raise EdgeLoraError(f"llama.cpp could not tokenize a text of {len(data)} bytes", path=None)
        room = -n  # too small: llama.cpp says how many it needs
