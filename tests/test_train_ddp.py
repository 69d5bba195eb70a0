"""Data-parallel training: 2 CPU processes under torchrun (gloo) give the adapter of 1 process
with the same global batch."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gpu_env import child_env
from test_train_loop import make_data, tensors

ROOT = Path(__file__).resolve().parents[1]


def _torchrun():
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else ([shutil.which("torchrun")] if shutil.which("torchrun") else None)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, model_dirs):
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun not installed")
    data = make_data(tmp_path / "d.jsonl", "prompt", n=24)
    common = [
        "--model",
        str(model_dirs["llama"]),
        "--data",
        str(data),
        "--steps",
        "6",
        "--rank",
        "4",
        "--lr",
        "1e-2",
        "--seq-len",
        "40",
        "--grad-accum",
        "2",
        "--eval-every",
        "3",
        "--threads",
        "1",
        "--no-progress",
        "--compute-dtype",
        "fp32",
    ]  # bf16 rounds differently for other batch splits: the equality is an fp32 statement
    env = child_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    single = subprocess.run(
        [sys.executable, "-m", "edge_lora.train", *common, "--batch-size", "4", "--out", str(one)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            *torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "edge_lora.train",
            *common,
            "--batch-size",
            "2",
            "--out",
            str(two),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert '"world_size": 2' in (tmp_path / "two.safetensors.log.jsonl").read_text()
    a, b = tensors(one), tensors(two)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst
    assert any(np.abs(a[k]).max() > 0 for k in a if k.endswith(".B"))


def test_master_port_zero_fails_at_once_with_a_hint(tmp_path, model_dirs):
    """torchrun --master_port=0 hands every worker port 0: they would wait for each other forever."""
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun not installed")
    data = make_data(tmp_path / "d.jsonl", "prompt", n=4)
    env = child_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            *torchrun,
            "--nproc_per_node=2",
            "--master_port=0",
            "-m",
            "edge_lora.train",
            "--model",
            str(model_dirs["llama"]),
            "--data",
            str(data),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "a.safetensors"),
            "--no-progress",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "--master_port=0" in run.stderr and "--standalone" in run.stderr
