import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, make_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """family -> a tiny model directory (built once per test session)."""
    root = tmp_path_factory.mktemp("models")
    return {family: make_model_dir(root / family, family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
