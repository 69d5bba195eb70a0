"""``edge-lora train``: flags for every :class:`~.config.TrainConfig` setting, an optional YAML/JSON
config file (flags win), and a one-line error for anything a user got wrong."""

from __future__ import annotations

import argparse
import sys

from edge_lora.errors import EdgeLoraError
from edge_lora.train.config import COMPUTE_CHOICES, DEVICE_CHOICES, QUANT_CHOICES, TrainConfig

S = argparse.SUPPRESS  # every flag's default: only the flags given override the config file


def _bool_flag(group: argparse._ArgumentGroup, name: str, help: str) -> None:
    group.add_argument(
        f"--{name}",
        dest=name.replace("-", "_"),
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help=help,
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trainer's flags. Every default is SUPPRESS, so only flags actually given override the
    config file and the dataclass defaults (see :class:`TrainConfig` for the defaults)."""
    _add_input_output_flags(parser.add_argument_group("inputs and outputs"))
    _add_data_flags(parser.add_argument_group("data"))
    _add_lora_flags(parser.add_argument_group("LoRA"))
    _add_optimisation_flags(parser.add_argument_group("optimisation"))
    _add_evaluation_flags(parser.add_argument_group("evaluation and checkpoints"))
    _add_memory_flags(parser.add_argument_group("memory and devices"))
    out = parser.add_argument_group("output")
    out.add_argument("--log-every", type=int, default=S, help="progress/log line every N steps (1)")
    _bool_flag(out, "progress", "show the progress line")
    return parser


def _add_input_output_flags(io: argparse._ArgumentGroup) -> None:
    io.add_argument("--config", default=None, help="YAML or JSON file with any of these settings (flags win)")
    io.add_argument(
        "--model", default=S, help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)"
    )
    io.add_argument(
        "--data",
        default=S,
        help="training JSONL: {text} | {prompt, completion} | {messages: [{role, content}]}",
    )
    io.add_argument(
        "--eval-data", default=S, help="evaluation JSONL (default: carve --eval-split off --data)"
    )
    io.add_argument("--out", default=S, help="adapter file to write (adapter.safetensors)")
    io.add_argument("--log-file", default=S, help="metrics JSONL, appended (default: OUT.log.jsonl)")


def _add_data_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument("--seq-len", type=int, default=S, help="truncate (or pack) to this many tokens (512)")
    _bool_flag(
        data, "packing", "pack whole examples into --seq-len rows; attention and positions stay per example"
    )
    data.add_argument(
        "--eval-split",
        type=float,
        default=S,
        help="fraction of --data held out when no --eval-data (0.05; 0 = none)",
    )
    data.add_argument("--max-eval-samples", type=int, default=S, help="cap on evaluation examples (0 = all)")


def _add_lora_flags(lora: argparse._ArgumentGroup) -> None:
    lora.add_argument("--rank", "-r", type=int, default=S, help="LoRA rank (8)")
    lora.add_argument("--alpha", type=float, default=S, help="LoRA alpha (16)")
    lora.add_argument("--dropout", type=float, default=S, help="LoRA dropout (0)")
    lora.add_argument(
        "--targets",
        default=S,
        help="all-linear | attention | mlp | names (q_proj,v_proj) | a regex over module names",
    )
    _bool_flag(lora, "rslora", "scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    _bool_flag(lora, "dora", "weight-decomposed LoRA (magnitude vectors saved in the adapter)")
    lora.add_argument(
        "--lora-plus-ratio",
        type=float,
        default=S,
        help="LoRA+: learning rate of B = ratio x lr (0 = off; 16 is typical)",
    )
    lora.add_argument(
        "--add-tokens",
        default=S,
        help="comma-separated new tokens; only their embedding (and output) rows are trained",
    )
    lora.add_argument(
        "--alora-invocation",
        default=S,
        metavar="TEXT",
        help="activated LoRA (PEFT's aLoRA): the adapter acts only from the last occurrence of TEXT's "
        "tokens in each example on (the base before it); every example must contain it before its response",
    )


def _add_optimisation_flags(opt: argparse._ArgumentGroup) -> None:
    opt.add_argument("--lr", type=float, default=S, help="peak learning rate (2e-4)")
    opt.add_argument(
        "--min-lr-ratio", type=float, default=S, help="cosine schedule floor as a fraction of lr (0)"
    )
    opt.add_argument("--warmup-steps", type=int, default=S, help="linear warmup steps (0)")
    opt.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay on A and B (0)")
    opt.add_argument("--adam-beta1", type=float, default=S)
    opt.add_argument("--adam-beta2", type=float, default=S)
    opt.add_argument("--adam-eps", type=float, default=S)
    opt.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping (1.0; 0 = off)")
    opt.add_argument("--batch-size", type=int, default=S, help="sequences per micro-batch per process (4)")
    opt.add_argument("--grad-accum", type=int, default=S, help="micro-batches per optimizer step (1)")
    opt.add_argument("--steps", type=int, default=S, help="optimizer steps (0 = from --epochs)")
    opt.add_argument("--epochs", type=float, default=S, help="passes over the data when --steps is 0 (1)")
    opt.add_argument("--seed", type=int, default=S, help="seed for LoRA init, data order and dropout (0)")


def _add_evaluation_flags(ev: argparse._ArgumentGroup) -> None:
    ev.add_argument("--eval-every", type=int, default=S, help="evaluate every N steps (0 = at the end only)")
    ev.add_argument(
        "--patience", type=int, default=S, help="stop after N evaluations without improvement (0 = never)"
    )
    ev.add_argument(
        "--min-delta", type=float, default=S, help="smallest eval-loss drop that counts as improvement"
    )
    ev.add_argument(
        "--checkpoint-every",
        type=int,
        default=S,
        help="write a resumable checkpoint every N steps (0 = never)",
    )
    ev.add_argument("--checkpoint-dir", default=S, help="where checkpoints go (default: OUT.checkpoints)")
    ev.add_argument("--keep-checkpoints", type=int, default=S, help="how many recent checkpoints to keep (2)")
    ev.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=S,
        help="continue from the latest checkpoint (or the given file)",
    )


def _add_memory_flags(mem: argparse._ArgumentGroup) -> None:
    mem.add_argument(
        "--base-quant",
        choices=QUANT_CHOICES,
        default=S,
        help="keep the frozen base quantized in memory (none): int8/int4 (groups of --quant-group-size), "
        "or the export's own format, bit for bit what the device runs: q4_0, q8_0 (GGUF), onnx-int4",
    )
    mem.add_argument(
        "--base-importance",
        default=S,
        metavar="BUNDLE|FILE",
        help="with --base-quant q4_0/onnx-int4: the calibration the export used (the bundle, or its "
        "importance.safetensors), so the base is the device's bit for bit; without it, the base is "
        "what `export --calibration none` writes",
    )
    mem.add_argument(
        "--quant-group-size",
        type=int,
        default=S,
        help="columns per quantization scale (128 for int8, 32 for int4)",
    )
    _bool_flag(
        mem, "gradient-checkpointing", "recompute activations in the backward pass (less memory, slower)"
    )
    mem.add_argument(
        "--device", choices=DEVICE_CHOICES, default=S, help="auto picks cuda, then mps, then cpu"
    )
    mem.add_argument(
        "--compute-dtype",
        choices=COMPUTE_CHOICES,
        default=S,
        help="bf16: base weights and matmuls in bf16, LoRA weights and optimizer fp32; auto (default) = "
        "bf16 where the device has it natively (AMX or AVX512-BF16 CPUs, CUDA), else fp32",
    )
    mem.add_argument("--threads", type=int, default=S, help="CPU threads for torch (0 = torch's default)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    if getattr(args, "config", None):
        cfg.update(TrainConfig.from_file(args.config), path=args.config)
    flags = {k: v for k, v in vars(args).items() if k != "config" and k in TrainConfig.__dataclass_fields__}
    cfg.update(flags, warn=False)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    """Run the trainer from parsed arguments; user errors become one line on stderr and exit code 2."""
    try:
        from edge_lora.train.trainer import train

        cfg = config_from_args(args)
        train(cfg)
    except EdgeLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "edge-lora train: interrupted (resume with --resume if checkpoints were written)", file=sys.stderr
        )
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-lora train", description="Train a LoRA adapter for an edge-lora base model."
    )
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
