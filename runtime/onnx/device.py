"""ONNX Runtime on a GPU: the WebGPU execution provider (Vulkan, Metal or D3D12 underneath) and
tensors that stay on the device.

The provider ships as a plugin (``pip install onnxruntime-ep-webgpu``) that is registered with
ONNX Runtime once per process; its devices then appear in ``ort.get_ep_devices()``. On the device,
the decode loop binds device OrtValues: the KV cache and the LoRA feeds are uploaded once and stay
there, so a step moves only the new token in and the logits out (:class:`DeviceTensors` counts
what it uploads, for the tests and the benchmark).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.errors import EdgeLoraError, first_line
from runtime.devices import CPU, Device

if TYPE_CHECKING:
    from onnxruntime import InferenceSession, OrtEpDevice, OrtValue

WEBGPU = "WebGpuExecutionProvider"
# One WebGPU device per process, and it is not safe to use from two threads at once (a run on one
# and an allocation on another aborted the process): every session load, run, upload and download
# on it takes this lock. Concurrent requests interleave step by step; the device is serial anyway.
DEVICE_LOCK = threading.RLock()
_registry = {"lock": threading.Lock(), "tried": False, "error": None}

NO_PLUGIN = "pip install onnxruntime-ep-webgpu (ONNX Runtime's WebGPU provider)"
NO_ADAPTER = (
    "install the GPU's Vulkan (Linux, Android), Metal (macOS) or D3D12 (Windows) driver; "
    "on a machine without a GPU, scripts/software-gpu.sh sets up SwiftShader for testing"
)


def _register(ort: ModuleType) -> str | None:
    """Register the WebGPU plugin with ONNX Runtime once per process; the reason it cannot be, or None."""
    with _registry["lock"]:
        if not _registry["tried"]:
            _registry["tried"] = True
            try:
                import onnxruntime_ep_webgpu as plugin
            except ImportError:
                _registry["error"] = f"ONNX Runtime has no WebGPU provider here: {NO_PLUGIN}"
            else:
                if not hasattr(ort, "register_execution_provider_library"):
                    _registry["error"] = (
                        f"onnxruntime {ort.__version__} cannot load provider plugins: upgrade onnxruntime"
                    )
                else:
                    try:
                        ort.register_execution_provider_library("webgpu", plugin.get_library_path())
                    except Exception as err:  # ORT raises its own types; "already registered" is fine
                        if "already" not in str(err).lower():
                            _registry["error"] = (
                                f"ONNX Runtime could not load the WebGPU provider ({first_line(err)})"
                            )
        return _registry["error"]


def find_webgpu(ort: ModuleType, want: str) -> tuple[Device, OrtEpDevice | None]:
    """The device for ``want`` ("gpu" or "auto"): ``(Device, OrtEpDevice)``, or ``(CPU, None)`` when
    ``auto`` finds no hardware GPU. ``gpu`` without a usable device raises, saying what is missing."""
    reason = _register(ort)
    found = [] if reason else [d for d in ort.get_ep_devices() if d.ep_name == WEBGPU]
    if not found and reason is None:
        reason = f"the WebGPU provider found no GPU adapter: {NO_ADAPTER}"
    if not found:
        if want == "gpu":
            raise EdgeLoraError(f"device='gpu': {reason}", hint="or run on device='cpu'")
        return CPU, None
    ep_device = found[0]
    hardware = ep_device.device
    software = hardware.type == ort.OrtHardwareDeviceType.CPU  # a software adapter stands in on the CPU
    if software and want == "auto":
        return CPU, None
    description = dict(hardware.metadata).get("Description") or hardware.vendor or "unknown vendor"
    name = f"WebGPU ({description}{', software adapter' if software else ''})"
    return Device("gpu", name, software=software), ep_device


class DeviceTensors:
    """Allocations, uploads and downloads of one device's memory, counted."""

    def __init__(self, ort: ModuleType, ep_device: OrtEpDevice) -> None:
        self._ort = ort
        self.memory = ep_device.memory_info(ort.OrtDeviceMemoryType.DEFAULT)
        self._lock = threading.Lock()
        self.uploads: dict[str, list[int]] = {}  # what ("lora", "kv") -> [count, bytes]

    def empty(self, shape: Sequence[int], dtype: type) -> OrtValue:
        with DEVICE_LOCK:
            return self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), dtype, memory_info=self.memory
            )

    def upload(self, source: np.ndarray | OrtValue, what: str, into: OrtValue | None = None) -> OrtValue:
        """A device copy of a numpy array or a host OrtValue (into ``into`` when given), counted under
        ``what``."""
        host = (
            source
            if isinstance(source, self._ort.OrtValue)
            else self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(source))
        )
        with DEVICE_LOCK:
            value = into if into is not None else self.empty(host.shape(), _numpy_dtype(host))
            self._ort.copy_tensors([host], [value], None)
        with self._lock:
            count = self.uploads.setdefault(what, [0, 0])
            count[0] += 1
            count[1] += host.tensor_size_in_bytes()
        return value

    def download(self, value: OrtValue) -> np.ndarray:
        host = np.empty(value.shape(), _numpy_dtype(value))
        with DEVICE_LOCK:
            self._ort.copy_tensors([value], [self._ort.OrtValue.ortvalue_from_numpy(host)], None)
        return host

    def info(self) -> dict:
        with self._lock:
            return {"uploads": {what: {"count": n, "bytes": b} for what, (n, b) in self.uploads.items()}}


_ELEMENT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def _numpy_dtype(value: OrtValue) -> type:
    return _ELEMENT_DTYPES[value.data_type()]


def node_placement(session: InferenceSession) -> dict[str, list[tuple[str, str]]]:
    """``{provider: [(op_type, node name), ...]}`` of a session opened with
    ``session.record_ep_graph_assignment_info`` on."""
    placement: dict[str, list[tuple[str, str]]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        placement.setdefault(subgraph.ep_name, []).extend((n.op_type, n.name) for n in subgraph.get_nodes())
    return placement
