"""ONNX Runtime's C API through ctypes: the few calls the CPU engine needs that the Python binding
lacks, above all sessions sharing one prepacked-weights container (two graphs over the same weights,
one copy of their prepacked layout in memory), and a decode step with no binding layer in between.

The onnxruntime wheel ships its C library (``onnxruntime/capi/libonnxruntime.so.*``) beside the
Python binding; it is found without importing the binding. ``OrtApi`` is a table of function pointers
that only ever grows (ONNX Runtime keeps it ABI-stable), so each call is its fixed index in
``onnxruntime_c_api.h``; :data:`API_VERSION` is the oldest table that has every one used here.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from ctypes import POINTER, byref, c_char_p, c_int, c_int64, c_size_t, c_uint32, c_void_p
from pathlib import Path

import numpy as np

from edge_lora.errors import EdgeLoraError

API_VERSION = 13  # ONNX Runtime 1.13's table has every function below (1.32 is tested)

# index in struct OrtApi -> (name, argument types); every one returns an OrtStatus* (NULL = success)
_STATUS_CALLS = {
    "CreateEnv": (3, [c_int, c_char_p, POINTER(c_void_p)]),
    "CreateSessionOptions": (10, [POINTER(c_void_p)]),
    "EnableProfiling": (14, [c_void_p, c_char_p]),
    "SetSessionLogSeverityLevel": (22, [c_void_p, c_int]),
    "SetSessionGraphOptimizationLevel": (23, [c_void_p, c_int]),
    "SetIntraOpNumThreads": (24, [c_void_p, c_int]),
    "SetInterOpNumThreads": (25, [c_void_p, c_int]),
    "SessionGetOutputCount": (31, [c_void_p, POINTER(c_size_t)]),
    "SessionGetOverridableInitializerCount": (32, [c_void_p, POINTER(c_size_t)]),
    "SessionGetOutputName": (37, [c_void_p, c_size_t, c_void_p, POINTER(c_void_p)]),
    "SessionGetOverridableInitializerName": (38, [c_void_p, c_size_t, c_void_p, POINTER(c_void_p)]),
    "CreateTensorWithDataAsOrtValue": (
        49,
        [c_void_p, c_void_p, c_size_t, POINTER(c_int64), c_size_t, c_int, POINTER(c_void_p)],
    ),
    "CreateCpuMemoryInfo": (69, [c_int, c_int, POINTER(c_void_p)]),
    "AllocatorFree": (76, [c_void_p, c_void_p]),
    "GetAllocatorWithDefaultOptions": (78, [POINTER(c_void_p)]),
    "SessionEndProfiling": (110, [c_void_p, c_void_p, POINTER(c_void_p)]),
    "AddSessionConfigEntry": (130, [c_void_p, c_char_p, c_char_p]),
    "RunWithBinding": (133, [c_void_p, c_void_p, c_void_p]),
    "CreateIoBinding": (134, [c_void_p, POINTER(c_void_p)]),
    "BindInput": (136, [c_void_p, c_char_p, c_void_p]),
    "BindOutput": (137, [c_void_p, c_char_p, c_void_p]),
    "AddInitializer": (150, [c_void_p, c_char_p, c_void_p]),
    "CreatePrepackedWeightsContainer": (166, [POINTER(c_void_p)]),
    "CreateSessionWithPrepackedWeightsContainer": (
        168,
        [c_void_p, c_char_p, c_void_p, c_void_p, POINTER(c_void_p)],
    ),
    "CreateSessionFromArrayWithPrepackedWeightsContainer": (
        169,
        [c_void_p, c_void_p, c_size_t, c_void_p, c_void_p, POINTER(c_void_p)],
    ),
}
_RELEASES = {
    "ReleaseEnv": 92,
    "ReleaseStatus": 93,
    "ReleaseMemoryInfo": 94,
    "ReleaseSession": 95,
    "ReleaseValue": 96,
    "ReleaseSessionOptions": 100,
    "ReleaseIoBinding": 135,
    "ReleasePrepackedWeightsContainer": 167,
}
_GET_ERROR_MESSAGE = 2

# ONNXTensorElementDataType
ELEMENT_TYPES = {
    np.dtype(np.float32): 1,
    np.dtype(np.uint8): 2,
    np.dtype(np.int8): 3,
    np.dtype(np.int32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.float16): 10,
}
ORT_ENABLE_ALL = 99
LOG_ERROR = 3


class _OrtApiBase(ctypes.Structure):
    _fields_ = [
        ("GetApi", ctypes.CFUNCTYPE(c_void_p, c_uint32)),
        ("GetVersionString", ctypes.CFUNCTYPE(c_char_p)),
    ]


def library_path() -> Path:
    """The C library inside the installed onnxruntime package (its Python binding is not imported)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeLoraError("onnxruntime is not installed", hint="pip install 'edge-lora[onnx]'")
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    found = sorted(capi.glob("libonnxruntime.so*")) + sorted(capi.glob("libonnxruntime*.dylib"))
    found += sorted(capi.glob("onnxruntime.dll"))
    if not found:
        raise EdgeLoraError(
            "this onnxruntime package ships no C library",
            path=capi,
            hint="pip install the official onnxruntime",
        )
    return found[0]


class OrtApi:
    """The function table, each call wrapped so that a failing status raises :class:`OrtError`."""

    _instance: OrtApi | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> OrtApi:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls(library_path())
            return cls._instance

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.OrtGetApiBase.restype = POINTER(_OrtApiBase)
        base = self.lib.OrtGetApiBase().contents
        self.version = base.GetVersionString().decode()
        table = base.GetApi(API_VERSION)
        if not table:
            raise EdgeLoraError(f"onnxruntime {self.version} does not offer C API version {API_VERSION}")
        slots = ctypes.cast(table, POINTER(c_void_p))
        self._error_message = ctypes.CFUNCTYPE(c_char_p, c_void_p)(slots[_GET_ERROR_MESSAGE])
        for name, index in _RELEASES.items():
            setattr(self, name, ctypes.CFUNCTYPE(None, c_void_p)(slots[index]))
        for name, (index, argtypes) in _STATUS_CALLS.items():
            setattr(self, name, self._checked(name, ctypes.CFUNCTYPE(c_void_p, *argtypes)(slots[index])))
        self.env = self._out(self.CreateEnv, LOG_ERROR, b"edge-lora")
        self.cpu_memory = self._out(self.CreateCpuMemoryInfo, 0, 0)  # device allocator, default mem type
        self.allocator = self._out(self.GetAllocatorWithDefaultOptions)

    def _checked(self, name: str, function: object) -> object:
        def call(*args: object) -> None:
            status = function(*args)
            if status:
                message = self._error_message(status).decode(errors="replace")
                self.ReleaseStatus(status)
                raise OrtError(f"{name}: {message}")

        return call

    @staticmethod
    def _out(call: object, *args: object) -> c_void_p:
        """Call an API function whose last argument is an output pointer; return what it wrote."""
        out = c_void_p()
        call(*args, byref(out))
        return out

    def take_string(self, pointer: c_void_p) -> str:
        """A string ONNX Runtime allocated with the default allocator, copied and freed."""
        text = ctypes.string_at(pointer).decode()
        self.AllocatorFree(self.allocator, pointer)
        return text


class OrtError(RuntimeError):
    """A failing OrtStatus, with ONNX Runtime's message."""


class Tensor:
    """An OrtValue over a numpy array's memory (no copy): the array must outlive every use, so the
    tensor holds it."""

    __slots__ = ("api", "array", "value")

    def __init__(self, api: OrtApi, array: np.ndarray) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("a tensor needs a C-contiguous array")
        self.api, self.array = api, array
        shape = (c_int64 * max(array.ndim, 1))(*array.shape)
        self.value = api._out(
            api.CreateTensorWithDataAsOrtValue,
            api.cpu_memory,
            c_void_p(array.ctypes.data),
            array.nbytes,
            shape,
            array.ndim,
            ELEMENT_TYPES[array.dtype],
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __del__(self) -> None:
        if getattr(self, "value", None):
            self.api.ReleaseValue(self.value)
            self.value = None
