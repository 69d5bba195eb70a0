"""Device choice, shared by both backends: ``"cpu"``, ``"gpu"`` or ``"auto"``.

``auto`` takes a hardware GPU when the backend can use one and the CPU otherwise; it never takes a
software rasterizer (SwiftShader, Mesa's llvmpipe/lavapipe), which is slower than the CPU it runs
on. ``gpu`` takes whatever GPU device the backend finds, software ones included (that is how the
tests run the GPU code on a machine without a GPU), and fails with one line that says what is
missing when there is none: it never falls back to the CPU silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_lora.errors import EdgeLoraError

DEVICES = ("cpu", "gpu", "auto")
# adapter names of the software Vulkan drivers: fine for tests, never an automatic choice
SOFTWARE_ADAPTERS = ("swiftshader", "llvmpipe", "lavapipe", "software")


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "gpu"
    name: (
        str  # what the backend calls it, e.g. "Vulkan0 (llvmpipe ...)" or "WebGPU (Intel, software adapter)"
    )
    software: bool = False  # a software rasterizer standing in for a GPU

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "software": self.software}


CPU = Device("cpu", "CPU")


def check_device(device: str) -> str:
    choice = str(device).lower()
    if choice not in DEVICES:
        raise EdgeLoraError(f"unknown device {device!r}", hint=f"choose {', '.join(DEVICES)}")
    return choice


def is_software(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in SOFTWARE_ADAPTERS)
