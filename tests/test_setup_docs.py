"""What the README, the help text and the set-up scripts tell a new user is what happens: the set-up
commands work on a fresh machine with no package-registry host written anywhere (apt takes the mirror
from the machine's own sources), and the quickstart's help counts the adapters it trains."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from gpu_env import child_env

from edge_lora.app.quickstart.tasks import STYLES, TASKS

ROOT = Path(__file__).resolve().parents[1]
REGISTRY_HOSTS = ("deb.debian.org", "download.pytorch.org", "pypi.org", "files.pythonhosted.org")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [
        ROOT / n
        for n in names
        if Path(n).suffix in (".md", ".sh", ".py", ".toml", ".txt", "") and (ROOT / n).is_file()
    ]


def test_no_file_names_a_package_registry_host():
    found = [
        f"{path.relative_to(ROOT)}: {host}"
        for path in tracked_text_files()
        for host in REGISTRY_HOSTS
        if host in path.read_text(errors="replace") and path.name != Path(__file__).name
    ]
    assert not found, found


def test_software_gpu_takes_backports_from_the_machines_own_apt_sources():
    script = (ROOT / "scripts" / "software-gpu.sh").read_text()
    assert 'bash "$here/enable-backports.sh"' in script
    assert "URIs:" not in script  # it writes no apt source itself


def test_readme_set_up_commands_install_torch_plainly():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2
    for line in commands:
        assert "pip install torch==2.13.0 && " in line and "--index-url" not in line
    assert commands[0].endswith("pip install -e '.[all]' && edge-lora quickstart")
    assert commands[1].endswith("ruff check . && ruff format --check . && python -m pytest")


def test_quickstart_help_counts_the_adapters_it_trains():
    proc = subprocess.run(
        [sys.executable, "-m", "edge_lora", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    line = " ".join(proc.stdout.split())
    counted = re.search(r"quickstart .*?train (\d+) adapters", line)
    assert counted, proc.stdout
    assert int(counted.group(1)) == len(TASKS) + len(STYLES) == 4
