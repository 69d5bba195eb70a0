"""Atomic writes: the new file replaces the old one whole, with the mode any other new file gets."""

import os
import stat

import pytest

from edge_lora.atomic import DEFAULT_FILE_MODE, atomic_path, atomic_write_text


def test_replaces_whole_and_keeps_normal_permissions(tmp_path):
    target = tmp_path / "bundle.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == DEFAULT_FILE_MODE  # not mkstemp's 0600
    assert DEFAULT_FILE_MODE & stat.S_IRUSR
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.json"]  # no temporary left behind


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.safetensors"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["a.safetensors"]


def test_private_files_are_private_from_the_start(tmp_path):
    seen = []
    with atomic_path(tmp_path / "signing.key", mode=0o600) as tmp:
        seen.append(stat.S_IMODE(tmp.stat().st_mode))
        tmp.write_bytes(b"secret")
    assert seen == [0o600] and stat.S_IMODE((tmp_path / "signing.key").stat().st_mode) == 0o600
