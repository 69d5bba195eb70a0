"""Training benchmark: edge-lora's trainer against transformers + PEFT, same model, same run.

A random-weight model shaped like SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 KV heads, vocab 49152, tied embeddings; fp32 safetensors, nothing downloaded), LoRA rank 16 on
all linear layers, batch 4 x 256 tokens, 2 threads, AdamW. Each case runs in its own subprocess and
reports training tokens/s (timed steps after one warm-up step) and the process's peak RSS (VmHWM:
loading included). Cases: PEFT (fp32, as users run it on a CPU), edge-lora with the float base, with
the base in int8 and int4, and int8 with gradient checkpointing, each at the trainer's default
compute dtype (``auto``: where the CPU has AMX or AVX512-BF16 it times a few passes in fp32 and in bf16
and takes the faster, else fp32); full runs add the float base at fp32 and at bf16 compute on both
shapes (the 0.5B one at int4), so ``dtype_choice`` shows auto against the faster of the two.

Our side runs the trainer's own step (``TrainModule`` + AdamW + clipping from edge_lora.train);
PEFT's side is the usual ``model(input_ids, labels=...)`` loop with ``get_peft_model``.

    python -m benchmarks.train_bench --quick     # 2 timed steps per case
    python -m benchmarks.train_bench             # 5 timed steps per case
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)
RANK, ALPHA, BATCH, SEQ, THREADS = 16, 32, 4, 256, 2
CASES = [  # (name, worker, base_quant, gradient_checkpointing, compute dtype)
    ("peft", "peft", "none", False, "fp32"),
    ("edge-lora fp32", "ours", "none", False, "auto"),
    ("edge-lora int8", "ours", "int8", False, "auto"),
    ("edge-lora int4", "ours", "int4", False, "auto"),
    ("edge-lora int8 + grad ckpt", "ours", "int8", True, "auto"),
]
EXTRA_CASES = [  # full runs only: auto against both dtypes
    ("edge-lora fp32, fp32 compute", "ours", "none", False, "fp32"),
    ("edge-lora fp32, bf16 compute", "ours", "none", False, "bf16"),
]
# issue 19's targets against PEFT in the same run: (case, min speed ratio, max peak-RSS ratio)
TARGETS = [("edge-lora fp32", 1.3, 0.8), ("edge-lora int8", 1.3, 0.5), ("edge-lora int4", 1.3, 0.4)]
# full runs only: what a user of the biggest model we target sees (Qwen2.5-0.5B's published shape, int4 base)
REAL_SIZE = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151643,
)


def make_model(out: Path, shape: dict = SHAPE, family: str = "llama") -> Path:
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = (
        Qwen2Config(**shape, architectures=["Qwen2ForCausalLM"])
        if family == "qwen2"
        else LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _peak_rss_mb() -> float:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a worker spawned by a big parent
    (the benchmark runner) would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def _batches(n: int, vocab: int = SHAPE["vocab_size"]):
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (BATCH, SEQ), generator=g) for _ in range(n)]


def worker_ours(model_dir: str, steps: int, quant: str, grad_ckpt: bool, compute: str = "auto") -> dict:
    import torch

    from edge_lora.model_dir import ModelDir
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.devices import Dist, release_freed_memory_promptly
    from edge_lora.train.dtype_probe import DtypeChoice, measure_dtypes
    from edge_lora.train.optimizer import optimizer_groups
    from edge_lora.train.trainable_model import TrainModule, build_model

    release_freed_memory_promptly()  # what `edge-lora train` does at start
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = TrainConfig(
        model=model_dir,
        rank=RANK,
        alpha=ALPHA,
        targets="all-linear",
        base_quant=quant,
        gradient_checkpointing=grad_ckpt,
        compute_dtype=compute,
    )
    t0 = time.perf_counter()
    model = build_model(ModelDir(model_dir), cfg)
    load_s = time.perf_counter() - t0
    module = TrainModule(model).train()
    targets = torch.ones(BATCH, SEQ, dtype=torch.bool)
    targets[:, 0] = False
    batches = _batches(steps + 1, model.config.vocab_size)
    t0 = time.perf_counter()
    choice = DtypeChoice(model.compute_dtype, how="rule" if compute == "auto" else "as asked")
    # auto on native bf16: the trainer's own measurement (as its settle_compute_dtype does)
    if model.compute_dtype is None:

        def run_pass(bf16: bool) -> None:
            module.bf16 = bf16
            module(batches[0], targets).backward()

        choice = measure_dtypes(model, run_pass, Dist(), torch.device("cpu"))
        module.bf16 = choice.dtype == torch.bfloat16
    probe_s = time.perf_counter() - t0
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        optimizer_groups({n: p for n, p in module.named_parameters() if p.requires_grad}, cfg), lr=1e-4
    )
    times, losses = [], []
    for ids in batches:
        t = time.perf_counter()
        n = int(targets[:, 1:].sum())
        loss = module(ids, targets)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item() / n)
    return {
        **_result(times, losses, load_s, sum(p.numel() for p in params)),
        "compute_dtype": str(choice.dtype).removeprefix("torch."),
        "dtype_probe": {**choice.record(), "seconds": probe_s},
    }


def worker_peft(model_dir: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
    )
    load_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for ids in _batches(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return _result(times, losses, load_s, sum(p.numel() for p in params))


def _result(times, losses, load_s, trainable) -> dict:
    timed = times[1:]  # the first step warms up allocators and kernels
    step_s = sum(timed) / len(timed)
    return {
        "tokens_per_s": BATCH * SEQ / step_s,
        "step_s": step_s,
        "first_step_s": times[0],
        "load_s": load_s,
        "peak_rss_mb": _peak_rss_mb(),
        "trainable_parameters": trainable,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _spawn(
    model_dir: Path, steps: int, worker: str, quant: str, grad_ckpt: bool, compute: str = "auto"
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.train_bench",
        "--worker",
        worker,
        "--model-dir",
        str(model_dir),
        "--steps",
        str(steps),
        "--quant",
        quant,
        "--compute",
        compute,
    ] + (["--grad-ckpt"] if grad_ckpt else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, steps: int | None = None) -> dict:
    """Every case (full runs: the dtype cases and the 0.5B shape too), ``steps`` timed steps each
    (default 2 quick, 5 full)."""
    steps = steps or (2 if quick else 5)
    model_dir = make_model(
        Path(os.environ.get("EDGE_LORA_BENCH_DIR", Path(tempfile.gettempdir()) / "edge_lora_bench"))
        / "smollm2-135m-fp32"
    )
    cases = {}
    for name, worker, quant, ckpt, compute in CASES + ([] if quick else EXTRA_CASES):
        cases[name] = _spawn(model_dir, steps, worker, quant, ckpt, compute)
        print(
            f"{name:28s} {cases[name]['tokens_per_s']:7.1f} tok/s  "
            f"peak RSS {cases[name]['peak_rss_mb']:7.0f} MB",
            file=sys.stderr,
        )
    peft = cases["peft"]
    ratios = {
        name: {
            "speed_vs_peft": r["tokens_per_s"] / peft["tokens_per_s"],
            "rss_vs_peft": r["peak_rss_mb"] / peft["peak_rss_mb"],
        }
        for name, r in cases.items()
        if name != "peft"
    }
    targets = [
        {
            "case": name,
            "speed_vs_peft": ratios[name]["speed_vs_peft"],
            "rss_vs_peft": ratios[name]["rss_vs_peft"],
            "goal": f">= {speed}x speed at <= {rss}x peak RSS",
            "compute_dtype": cases[name].get("compute_dtype"),
            "met": ratios[name]["speed_vs_peft"] >= speed and ratios[name]["rss_vs_peft"] <= rss,
        }
        for name, speed, rss in TARGETS
    ]
    real = {} if quick else real_size_run()
    return {
        "benchmark": "train",
        "shape": "smollm2-135m (random weights)",
        "rank": RANK,
        "batch": BATCH,
        "seq": SEQ,
        "threads": THREADS,
        "timed_steps": steps,
        "cases": cases,
        "ratios": ratios,
        "real_size": real.get("auto", {}),
        "dtype_choice": dtype_choice(cases, real),
        "targets": targets,
    }


def dtype_choice(cases: dict, real: dict) -> list[dict]:
    """Per shape, ``--compute-dtype auto`` against the faster of fp32 and bf16 compute (goal: >= 0.95)."""
    rows = []
    shapes = [
        ("smollm2-135m, fp32 base", cases.get("edge-lora fp32"), cases, "edge-lora fp32, {} compute"),
        ("qwen2.5-0.5b, int4 base", real.get("auto"), real, "{}"),
    ]
    for shape, auto, pool, key in shapes:
        fp32, bf16 = pool.get(key.format("fp32")), pool.get(key.format("bf16"))
        if not (auto and fp32 and bf16):
            continue
        best = max(fp32["tokens_per_s"], bf16["tokens_per_s"])
        ratio = auto["tokens_per_s"] / best
        rows.append(
            {
                "shape": shape,
                "auto_dtype": auto["compute_dtype"],
                "auto_tok_s": auto["tokens_per_s"],
                "fp32_tok_s": fp32["tokens_per_s"],
                "bf16_tok_s": bf16["tokens_per_s"],
                "auto_vs_faster": ratio,
                "probe_s": auto.get("dtype_probe", {}).get("seconds"),
                "met": ratio >= 0.95,
            }
        )
    return rows


def dtype_rounds(rounds: int, steps: int) -> dict:
    """auto, fp32 and bf16 compute interleaved in ``rounds`` rounds on both shapes (SmolLM2-135M with
    its fp32 base, Qwen2.5-0.5B at int4): paired evidence for the dtype choice on a busy machine."""
    base = Path(os.environ.get("EDGE_LORA_BENCH_DIR", Path(tempfile.gettempdir()) / "edge_lora_bench"))
    shapes = {
        "smollm2-135m, fp32 base": (make_model(base / "smollm2-135m-fp32"), "none"),
        "qwen2.5-0.5b, int4 base": (make_model(base / "qwen2.5-0.5b-fp32", REAL_SIZE, "qwen2"), "int4"),
    }
    out = {}
    for shape, (model_dir, quant) in shapes.items():
        runs = []
        for _ in range(rounds):
            runs.append(
                {c: _spawn(model_dir, steps, "ours", quant, False, c) for c in ("auto", "fp32", "bf16")}
            )
            print(
                shape,
                {c: (r["compute_dtype"], round(r["tokens_per_s"], 1)) for c, r in runs[-1].items()},
                file=sys.stderr,
            )
        out[shape] = runs
    return out


def real_size_run(steps: int = 2) -> dict:
    """The Qwen2.5-0.5B shape (random weights; a 2 GB fp32 file, made once) at int4 for a few
    steps, at auto, fp32 and bf16 compute: tokens/s, peak RSS and the time 1,000 examples of 256
    tokens would take (at auto)."""
    base = Path(os.environ.get("EDGE_LORA_BENCH_DIR", Path(tempfile.gettempdir()) / "edge_lora_bench"))
    model_dir = make_model(base / "qwen2.5-0.5b-fp32", REAL_SIZE, "qwen2")
    out = {}
    for compute in ("auto", "fp32", "bf16"):
        result = _spawn(model_dir, steps, "ours", "int4", False, compute)
        result["seconds_per_1000_examples"] = 1000 * SEQ / result["tokens_per_s"]
        result["shape"] = "qwen2.5-0.5b (random weights), int4 base, rank 16 all-linear, batch 4 x 256"
        print(
            f"{'edge-lora int4, 0.5B, ' + compute:28s} {result['tokens_per_s']:7.1f} tok/s  "
            f"peak RSS {result['peak_rss_mb']:7.0f} MB  ({result['compute_dtype']})",
            file=sys.stderr,
        )
        out[compute] = result
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed steps per case")
    parser.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compute", default="auto", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dtype-rounds",
        type=int,
        default=0,
        help="only --compute-dtype auto / fp32 / bf16, interleaved, this many rounds per shape",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.worker:
        result = (
            worker_ours(args.model_dir, args.steps, args.quant, args.grad_ckpt, args.compute)
            if args.worker == "ours"
            else worker_peft(args.model_dir, args.steps)
        )
        print(json.dumps(result))
        return 0
    results = dtype_rounds(args.dtype_rounds, args.steps) if args.dtype_rounds else run(args.quick)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
