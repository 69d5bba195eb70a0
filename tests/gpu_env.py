"""The software-GPU switches, set here by the test setup and never by the library.

On a machine without a GPU, ``scripts/software-gpu.sh`` installs Mesa's lavapipe (a Vulkan driver
that runs on the CPU), ONNX Runtime's WebGPU plugin and a Vulkan build of llama-cpp-python. The
tests then let WebGPU take a software adapter and name lavapipe to llama.cpp, which skips
CPU-type Vulkan devices otherwise. On a machine with a real GPU none of this is needed, and a
switch the environment already sets wins.

The libraries read the switches once, lazily, at their first use in the process (which may come in
any test), so :func:`software_gpu` holds them for the whole session (tests/conftest.py) and restores
the environment after it. A child process never inherits them by accident: :func:`child_env` is the
environment a test gives a child, and only a child that asks for the GPU (``gpu=True``) gets them. A
native program linked to a Vulkan build would otherwise offload to lavapipe and compile its shaders
(25 s on a quiet machine, past 120 s on a busy one) in whatever test ran after a GPU test.

``EDGE_LORA_REQUIRE_GPU=1`` (CI) turns "no GPU here" from a skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

SETUP_HINT = "run scripts/software-gpu.sh in this environment (or use a machine with a GPU)"

# ``GGML_VK_DISABLE_F16`` makes llama.cpp's shaders compute in f32: the 1e-3 agreement the fp32 tests
# ask for is a statement about f32 arithmetic. The f16 default is measured in a child process without it
# (test_gpu.py's strong-adapter test: up to 2.8e-2 from transformers + PEFT, docs/mobile.md)
SWITCHES = {
    "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": "1",
    "GGML_VK_VISIBLE_DEVICES": "0",
    "GGML_VK_DISABLE_F16": "1",
}
_added: dict[str, str] = {}  # the switches software_gpu() set (not those the environment already had)


@contextmanager
def software_gpu() -> Iterator[dict[str, str]]:
    """The switches the environment lacks, set while the block runs and removed after it; yields them."""
    with pytest.MonkeyPatch.context() as mp:
        added = {k: v for k, v in SWITCHES.items() if k not in os.environ}
        for key, value in added.items():
            mp.setenv(key, value)
        _added.update(added)
        try:
            yield added
        finally:
            for key in added:
                _added.pop(key, None)


def child_env(*, gpu: bool = False, **extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, less the switches the tests set (unless
    ``gpu``: a child that runs on the software GPU on purpose), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if gpu or k not in _added}
    return {**env, **extra}


def gpu_required() -> bool:
    return os.environ.get("EDGE_LORA_REQUIRE_GPU") == "1"
