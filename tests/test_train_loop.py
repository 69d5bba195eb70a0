"""The training loop end to end: each data shape through the CLI, resume after a real SIGKILL,
early stopping, new tokens, DoRA, LoRA+, and the quantized base."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_env import child_env
from tiny_models import quick_train_config as quick_cfg

from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.train.cli import main as cli_main
from edge_lora.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over lazy dog select name from users where id".split()


def make_data(path: Path, shape: str, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            if shape == "text":
                row = {"text": sent(rng.randint(4, 20))}
            elif shape == "prompt":
                row = {"prompt": "Q: " + sent(4), "completion": " A: " + sent(4)}
            else:
                row = {
                    "messages": [
                        {"role": "user", "content": sent(4)},
                        {"role": "assistant", "content": sent(5)},
                    ]
                }
            f.write(json.dumps(row) + "\n")
    return path


def tensors(path):
    a = Adapter.load(path)
    out = {}
    for name, w in a.modules.items():
        out[f"{name}.A"], out[f"{name}.B"] = w.a, w.b
        if w.magnitude is not None:
            out[f"{name}.m"] = w.magnitude
    if a.embed_rows is not None:
        out["embed_rows"] = a.embed_rows
    if a.head_rows is not None:
        out["head_rows"] = a.head_rows
    return out


@pytest.mark.parametrize("shape, family", [("text", "llama"), ("prompt", "qwen2"), ("chat", "smollm")])
def test_each_data_shape_through_the_cli(tmp_path, model_dirs, shape, family):
    data = make_data(tmp_path / f"{shape}.jsonl", shape)
    out = tmp_path / "a.safetensors"
    rc = cli_main(
        [
            "--model",
            str(model_dirs[family]),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "3",
            "--rank",
            "4",
            "--seq-len",
            "48",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    md = ModelDir(model_dirs[family])
    adapter = Adapter.load(out, base=md.config, base_fingerprint=md.fingerprint)
    assert len(adapter.modules) == 14 and adapter.base_fingerprint == md.fingerprint
    assert any(np.abs(w.b).max() > 0 for w in adapter.modules.values())  # it trained
    events = [json.loads(line)["event"] for line in open(str(out) + ".log.jsonl")]
    assert events[0] == "start" and events.count("train") == 3 and events[-1] == "done"


def test_broken_file_stops_before_training(tmp_path, model_dirs, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    rc = cli_main(
        [
            "--model",
            str(model_dirs["llama"]),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "a.safetensors"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2:" in err and not (tmp_path / "a.safetensors").exists()


def test_loss_goes_down_and_reproducible(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl", "text", n=8)
    cfg = quick_cfg(
        tmp_path, model_dirs["llama"], data, steps=40, lr=1e-2, rank=16, eval_split=0, dropout=0.1
    )
    train(cfg)
    losses = [json.loads(line)["loss"] for line in open(cfg.log_path) if '"train"' in line]
    assert losses[-1] < losses[0] - 0.5, losses
    first = tensors(cfg.out)
    cfg2 = quick_cfg(
        tmp_path,
        model_dirs["llama"],
        data,
        steps=40,
        lr=1e-2,
        rank=16,
        eval_split=0,
        dropout=0.1,
        out=str(tmp_path / "b.safetensors"),
    )
    train(cfg2)
    second = tensors(cfg2.out)
    assert all(np.array_equal(first[k], second[k]) for k in first)


def _run(args, env_extra=None, check=True):
    env = child_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_lora.train", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_resume_after_sigkill_equals_one_go(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl", "chat", n=20)
    common = [
        "--model",
        str(model_dirs["mistral"]),
        "--data",
        str(data),
        "--steps",
        "20",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--rank",
        "4",
        "--lr",
        "5e-3",
        "--seq-len",
        "40",
        "--dropout",
        "0.1",
        "--warmup-steps",
        "3",
        "--lora-plus-ratio",
        "4",
        "--eval-every",
        "5",
        "--threads",
        "1",
        "--no-progress",
    ]
    one_go = tmp_path / "one.safetensors"
    _run([*common, "--out", str(one_go)])

    out = tmp_path / "two.safetensors"
    ck = tmp_path / "ck"
    run = [*common, "--out", str(out), "--checkpoint-every", "5", "--checkpoint-dir", str(ck)]
    # killed (SIGKILL) while writing the step-15 checkpoint: the step-10 one must survive intact
    killed = _run(run, {"EDGE_LORA_TEST_KILL": "checkpoint-written-15"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    names = sorted(p.name for p in ck.iterdir())
    assert "step-00000010.safetensors" in names and "step-00000015.safetensors" not in names
    resumed = _run([*run, "--resume"])
    assert resumed.returncode == 0
    a, b = tensors(one_go), tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # a killed step (not during a checkpoint) resumes exactly too
    out3 = tmp_path / "three.safetensors"
    ck3 = tmp_path / "ck3"
    run3 = [*common, "--out", str(out3), "--checkpoint-every", "10", "--checkpoint-dir", str(ck3)]
    assert _run(run3, {"EDGE_LORA_TEST_KILL": "step-13"}, check=False).returncode == -signal.SIGKILL
    _run([*run3, "--resume"])
    c = tensors(out3)
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_resume_refuses_changed_settings(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl", "text", n=8)
    cfg = quick_cfg(tmp_path, model_dirs["llama"], data, steps=2, checkpoint_every=2)
    train(cfg)
    with pytest.raises(EdgeLoraError, match="'rank' was 4"):
        train(quick_cfg(tmp_path, model_dirs["llama"], data, steps=4, rank=8, resume="latest"))
    # more steps is fine
    summary = train(
        quick_cfg(tmp_path, model_dirs["llama"], data, steps=4, checkpoint_every=2, resume="latest")
    )
    assert summary["steps"] == 4


def test_early_stopping_keeps_the_best(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl", "prompt", n=16)
    cfg = quick_cfg(
        tmp_path,
        model_dirs["qwen2"],
        data,
        steps=50,
        eval_every=2,
        patience=2,
        min_delta=1e9,
        eval_split=0.25,
        checkpoint_every=100,
    )
    summary = train(cfg)
    assert (
        summary["stopped_early"] and summary["steps"] == 6
    )  # eval at 2 sets the best; 4 and 6 do not beat it by 1e9
    evals = [json.loads(line) for line in open(cfg.log_path) if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4, 6]
    # the written adapter is the step-2 (best) one: same as a 2-step run with the same schedule length
    ref = quick_cfg(
        tmp_path,
        model_dirs["qwen2"],
        data,
        steps=50,
        eval_split=0.25,
        out=str(tmp_path / "ref.safetensors"),
        eval_every=2,
        patience=1,
        min_delta=1e9,
    )
    train(ref)
    a, b = tensors(cfg.out), tensors(ref.out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["llama", "smollm"])  # untied head gets its own rows; tied shares them
def test_new_tokens(tmp_path, model_dirs, family):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i} <sql>", "completion": f" SELECT {i} </sql>"}) + "\n"
            for i in range(12)
        )
    )
    cfg = quick_cfg(
        tmp_path,
        model_dirs[family],
        data,
        steps=4,
        add_tokens=["<sql>", "</sql>"],
        targets="attention",
        eval_split=0,
    )
    train(cfg)
    md = ModelDir(model_dirs[family])
    adapter = Adapter.load(cfg.out, base=md.config, base_fingerprint=md.fingerprint)
    assert adapter.added_tokens == ["<sql>", "</sql>"] and adapter.embed_rows.shape == (2, 64)
    assert (adapter.head_rows is None) == (family == "smollm")
    if family == "llama":
        assert adapter.head_rows.shape == (2, 64)
    rows = adapter.embed_rows
    assert not np.allclose(rows[0], rows[1])  # trained away from the shared mean initialisation
    with pytest.raises(EdgeLoraError, match="already in the base vocabulary as id 2"):
        train(quick_cfg(tmp_path, model_dirs[family], data, add_tokens=["<|im_end|>"]))


def test_dora_and_rslora_train_and_save(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl", "text", n=8)
    cfg = quick_cfg(tmp_path, model_dirs["llama3"], data, dora=True, rslora=True, eval_split=0)
    train(cfg)
    adapter = Adapter.load(cfg.out)
    assert adapter.dora and adapter.rslora
    md = ModelDir(model_dirs["llama3"])
    name = "model.layers.0.mlp.down_proj"
    base_norm = np.linalg.norm(md.get(f"{name}.weight"), axis=1)
    assert not np.allclose(adapter.modules[name].magnitude, base_norm)  # magnitudes were trained


@pytest.mark.parametrize("family", ["llama", "smollm"])  # smollm: tied, its table quantized too
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_base_trains_close_to_fp32(tmp_path, model_dirs, quant, family):
    from edge_lora.train.quant import QuantLinear, dequantize, quantize

    w = torch.randn(48, 64)
    q, s, g = quantize(w, 8 if quant == "int8" else 4, 32)
    err = (dequantize(q, s, 8 if quant == "int8" else 4, 64) - w).abs().max() / w.abs().max()
    assert err < (0.01 if quant == "int8" else 0.15)
    data = make_data(tmp_path / "d.jsonl", "text", n=8)
    fp = quick_cfg(
        tmp_path,
        model_dirs[family],
        data,
        steps=6,
        lr=2e-2,
        eval_split=0,
        out=str(tmp_path / "fp.safetensors"),
    )
    qc = quick_cfg(
        tmp_path,
        model_dirs[family],
        data,
        steps=6,
        lr=2e-2,
        eval_split=0,
        base_quant=quant,
        out=str(tmp_path / "q.safetensors"),
    )
    train(fp)
    train(qc)
    loss = lambda c: [json.loads(line)["loss"] for line in open(c.log_path) if '"train"' in line]  # noqa: E731
    lf, lq = loss(fp), loss(qc)
    assert lq[-1] < lq[0] - 0.1
    assert abs(lf[0] - lq[0]) < (0.02 if quant == "int8" else 0.2)
    # the gradient through a quantized layer is the gradient through its dequantized weight
    layer = QuantLinear.from_weight(w, None, 8 if quant == "int8" else 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ layer.dequantized_weight().t()).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl", "text", n=8)
    a = quick_cfg(tmp_path, model_dirs["qwen2"], data, eval_split=0, out=str(tmp_path / "a.safetensors"))
    b = quick_cfg(
        tmp_path,
        model_dirs["qwen2"],
        data,
        eval_split=0,
        gradient_checkpointing=True,
        out=str(tmp_path / "b.safetensors"),
    )
    train(a)
    train(b)
    ta, tb = tensors(a.out), tensors(b.out)
    assert all(np.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
