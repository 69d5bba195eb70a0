"""The C library for the tests: built once per source tree by scripts/native-build.sh (cached under
$EDGE_LORA_CACHE/native), skipped where it cannot be built, a failure in CI (EDGE_LORA_REQUIRE_NATIVE=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def native_required() -> bool:
    return os.environ.get("EDGE_LORA_REQUIRE_NATIVE") == "1"


def build(sanitize: str = "") -> Path:
    """The build folder (libedge_lora.so, test_edge_lora, fuzz_parsers)."""
    env = dict(os.environ, PYTHON=sys.executable)
    if sanitize:
        env["EDGE_LORA_SANITIZE"] = sanitize
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "native-build.sh")], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        message = f"the C library did not build: {(done.stderr or done.stdout).strip()[-400:]}"
        if native_required():
            pytest.fail(message)
        pytest.skip(message)
    return Path(done.stdout.strip().splitlines()[-1])
