"""Nothing half-written: SIGKILL export, add-adapter and training at random moments, then check what is left.

Each worker imports everything first and prints READY, so the random kill lands in the writing itself,
not in Python's start-up. After each kill the target must be the old good state or the new good state:
a bundle whose every file matches bundle.json (old or new adapter set), an adapter file whose bytes are
the old run's or the finished new run's, checkpoints that all read back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import adapter_file
from gpu_env import child_env

from edge_lora.bundle import Bundle
from edge_lora.model_dir import ModelDir
from edge_lora.signing import verify_bundle

ROOT = Path(__file__).resolve().parents[1]
KILLS_PER_SCENARIO = int(os.environ.get("EDGE_LORA_KILLS", "4"))  # more on demand: EDGE_LORA_KILLS=50

EXPORT_WORKER = """
import json, sys
import gguf, onnx, onnxruntime  # heavy imports before READY: the kill should land in the writing
from converters.export import AdapterSource, ExportOptions, add_adapter, export_bundle
job = json.loads(sys.argv[1])
if job.get("kill_when_moving_out"):  # die exactly when the old bundle is renamed away, if it ever is
    import os, signal
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if os.path.abspath(src) == os.path.abspath(job["out"]):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
print("READY", flush=True)
if job["op"] == "export":
    sources = [AdapterSource(__import__("pathlib").Path(p), n) for p, n in job["adapters"]]
    export_bundle(job["model"], job["out"], sources, ExportOptions(force=True), show_progress=False)
else:
    add_adapter(job["out"], AdapterSource(__import__("pathlib").Path(job["adapter"]), job["name"]),
                replace=job["op"] == "replace", show_progress=False)
print("DONE", flush=True)
"""

TRAIN_WORKER = """
import json, sys
from edge_lora.train.config import TrainConfig
from edge_lora.train.trainer import train
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
print("READY", flush=True)
train(cfg)
print("DONE", flush=True)
"""


def start(worker: str, job: dict) -> subprocess.Popen:
    env = child_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", worker, json.dumps(job)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "READY", proc.stderr.read()
    return proc


def run_to_end(worker: str, job: dict) -> float:
    """Run a job without a kill; return the seconds it spent after READY."""
    proc = start(worker, job)
    began = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return time.perf_counter() - began


def kill_at_random(worker: str, job: dict, window_s: float, rng: random.Random) -> bool:
    """Start a job, SIGKILL it a random moment into its work; True if it was still running then."""
    proc = start(worker, job)
    time.sleep(rng.uniform(0.0, 0.9 * window_s))
    alive = proc.poll() is None
    proc.kill()
    proc.communicate(timeout=60)
    return alive and proc.returncode == -9


def bundle_state(root: Path) -> tuple[str, ...]:
    """The adapter names of a bundle that fully verifies (every file against bundle.json)."""
    verify_bundle(root)
    return tuple(sorted(Bundle.open(root).adapters))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dirs):
    md = ModelDir(model_dirs["llama"])
    root = tmp_path_factory.mktemp("kill_adapters")
    paths = {}
    for name, seed in (("sql", 1), ("tone", 2), ("tone_v2", 3)):
        paths[name] = adapter_file(md, root / f"{name}.safetensors", seed=seed)
    return paths


@pytest.fixture(scope="module")
def export_jobs(tmp_path_factory, model_dirs, adapters):
    out = tmp_path_factory.mktemp("kill_export") / "bundle"
    old = {
        "op": "export",
        "model": str(model_dirs["llama"]),
        "out": str(out),
        "adapters": [[str(adapters["sql"]), "sql"]],
    }
    jobs = {
        "old": old,
        "new": {**old, "adapters": [[str(adapters["sql"]), "sql"], [str(adapters["tone"]), "tone"]]},
        "add": {"op": "add", "out": str(out), "adapter": str(adapters["tone"]), "name": "tone"},
        "replace": {"op": "replace", "out": str(out), "adapter": str(adapters["tone_v2"]), "name": "tone"},
    }
    durations = {"new": run_to_end(EXPORT_WORKER, jobs["new"])}
    shutil.rmtree(out)
    run_to_end(EXPORT_WORKER, old)
    durations["add"] = run_to_end(EXPORT_WORKER, jobs["add"])
    durations["replace"] = run_to_end(EXPORT_WORKER, jobs["replace"])
    shutil.rmtree(out)
    return out, jobs, durations


# scenario -> (jobs that set up the old state, the job killed)
SCENARIOS = {
    "fresh_export": ((), "new"),
    "export_force_over_old": (("old",), "new"),
    "add_adapter": (("old",), "add"),
    "add_adapter_replace": (("old", "add"), "replace"),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_bundle_writers_survive_sigkill(scenario, export_jobs, adapters):
    out, jobs, durations = export_jobs
    setup, killed = SCENARIOS[scenario]
    rng = random.Random(f"{os.environ.get('EDGE_LORA_KILL_SEED', '1234')}-{scenario}")
    good_tone = {adapters[n].read_bytes() for n in ("tone", "tone_v2")}
    landed = 0
    for _ in range(KILLS_PER_SCENARIO):
        shutil.rmtree(out, ignore_errors=True)
        for job in setup:
            run_to_end(EXPORT_WORKER, jobs[job])
        landed += kill_at_random(EXPORT_WORKER, jobs[killed], durations[killed], rng)
        if not setup and not out.exists():
            continue  # killed before the new bundle moved in: nothing under the name, as before
        assert out.exists(), "killed between moving the old bundle away and moving the new one in"
        state = bundle_state(out)  # every file matches bundle.json
        assert state in {("sql",), ("sql", "tone")}
        if "tone" in state:  # the old tone or the new tone, whole
            bundle = Bundle.open(out)
            assert bundle.require(bundle.adapters["tone"]["source"]).read_bytes() in good_tone
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))
    print(
        f"\n{scenario}: {landed}/{KILLS_PER_SCENARIO} kills landed mid-work, all left old-or-new; "
        f"hidden leftovers beside the bundle: {len(leftovers)}"
    )
    assert landed >= 1  # some kills did land in the work, not after it


@pytest.mark.slow
def test_training_survives_sigkill(tmp_path, model_dirs):
    rng = random.Random(int(os.environ.get("EDGE_LORA_KILL_SEED", "1234")))
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"select name from users where id = {i} and the fox jumps"}) + "\n"
            for i in range(24)
        )
    )
    out = tmp_path / "adapter.safetensors"
    ckpt = tmp_path / "ck"
    job = dict(
        model=str(model_dirs["llama"]),
        data=str(data),
        out=str(out),
        steps=8,
        batch_size=2,
        seq_len=24,
        rank=4,
        alpha=8,
        lr=1e-2,
        progress=False,
        threads=1,
        checkpoint_every=2,
        checkpoint_dir=str(ckpt),
        eval_split=0,
        keep_checkpoints=100,
    )  # keep every checkpoint, so each one a killed run leaves has a reference
    duration = run_to_end(TRAIN_WORKER, job)
    print(f"\nuninterrupted training run: {duration:.2f} s after start-up")
    new_bytes = out.read_bytes()
    reference_ckpts = {p.name: p.read_bytes() for p in ckpt.iterdir() if not p.name.startswith(".")}
    old_bytes = b"old adapter: " + os.urandom(16)

    from edge_lora.adapter import Adapter
    from edge_lora.train.checkpoint import load_checkpoint

    landed = resumed = 0
    for i in range(KILLS_PER_SCENARIO):
        shutil.rmtree(ckpt, ignore_errors=True)
        out.write_bytes(old_bytes)
        landed += kill_at_random(TRAIN_WORKER, job, duration, rng)
        assert out.read_bytes() in (old_bytes, new_bytes), (
            "the adapter file is neither the old one nor the new one"
        )
        if out.read_bytes() == new_bytes:
            Adapter.load(out)
        for path in ckpt.iterdir() if ckpt.exists() else []:
            if path.name.startswith("."):
                continue  # a temporary name: never picked up by --resume
            load_checkpoint(path)
            assert path.read_bytes() == reference_ckpts[path.name], (
                f"{path.name} differs from the uninterrupted run's"
            )
        if i == 0:  # resuming from what is left finishes with the same adapter as one uninterrupted run
            has_checkpoint = ckpt.exists() and any(not p.name.startswith(".") for p in ckpt.iterdir())
            run_to_end(TRAIN_WORKER, {**job, "resume": "latest"} if has_checkpoint else job)
            assert out.read_bytes() == new_bytes
            resumed += 1
    print(
        f"\ntraining kills that landed mid-run: {landed}/{KILLS_PER_SCENARIO}, "
        f"resumed to the same adapter: {resumed}"
    )
    assert landed >= KILLS_PER_SCENARIO // 2


def test_export_force_swaps_bundles_in_one_step(export_jobs):
    """The moment between moving the old bundle away and the new one in: with an atomic exchange it does
    not exist."""
    out, jobs, _ = export_jobs
    shutil.rmtree(out, ignore_errors=True)
    run_to_end(EXPORT_WORKER, jobs["old"])
    proc = start(EXPORT_WORKER, {**jobs["new"], "kill_when_moving_out": True})
    proc.communicate(timeout=120)
    assert out.exists(), "killed while the old bundle was moved away: no bundle left"
    assert bundle_state(out) == ("sql", "tone") and proc.returncode == 0
