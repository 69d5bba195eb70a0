"""Putting a bundle on disk so that no reader ever sees half of one.

A fresh bundle is built in a hidden sibling folder named after the exporting process and moved into
place at the end (one atomic swap where the system has it); scratch folders that killed exports left
behind are removed by the next export. Single files are written under a temporary name and renamed.
Also the finishing touches bundle.json depends on: readable file modes and each file's SHA-256.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edge_lora.atomic import exchange_paths
from edge_lora.bundle import MANIFEST, sha256_file
from edge_lora.errors import EdgeLoraError


def check_target(out: Path, force: bool) -> None:
    """Refuse to write over a file, a bundle or a non-empty folder unless ``force``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise EdgeLoraError("output exists and is not a folder", path=out, hint="choose another --out")
    if any(out.iterdir()) and not force:
        what = "a bundle" if (out / MANIFEST).is_file() else "a non-empty folder"
        raise EdgeLoraError(
            f"output is already {what}",
            path=out,
            hint="pass --force to replace it, or `edge-lora export --add-adapter` to add adapters",
        )


def write_via_temp(target: Path, write: Callable[[Path], object]) -> None:
    """Let an exporter write a temporary name, then rename: a crash never leaves a torn file under
    ``target``."""
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")  # same suffix: writers may key on it
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def make_readable(root: Path) -> None:
    """Temporary files and folders are created private; a bundle is meant to be shipped and read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o755 if path.is_dir() else 0o644) & ~umask)


def hash_files(root: Path) -> dict[str, dict]:
    """``{relative path: {sha256, bytes}}`` of every file under ``root`` but bundle.json."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(root).as_posix()] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
    return files


def scratch_dir(out: Path, kind: str) -> Path:
    """A hidden sibling of ``out`` named after this process, so a later export can tell an abandoned one."""
    remove_abandoned_scratch(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


def remove_abandoned_scratch(out: Path) -> None:
    """Remove the scratch folders that killed exports to ``out`` left behind (their process is gone)."""
    for kind in ("partial", "old"):
        prefix = f".{out.name}.{kind}-"
        for leftover in out.parent.glob(glob.escape(prefix) + "*"):
            pid = leftover.name[len(prefix) :].split("-", 1)[0]
            if leftover.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # no signal 0 elsewhere: never remove what might be in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``staging`` folder: readers see the old bundle or the new one."""
    if out.exists() and exchange_paths(staging, out):  # one atomic swap: old or new, never neither
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old bundle
        return
    if out.exists():
        old = scratch_dir(out, "old")
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
