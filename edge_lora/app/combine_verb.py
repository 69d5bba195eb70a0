"""The `combine` verb: several adapters for one base combined into one adapter file.

edge-lora combine --adapter A[:W] --adapter B[:W] ... [--weights W,W,...] --method M --out OUT
                  [--rank R] [--density D] [--majority-sign total|frequency] [--clamp Q] [--seed S]
                  [--base BUNDLE|MODEL_DIR]

Inputs are edge-lora adapter files or PEFT directories; the math is edge_lora/combine.py (numpy only).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from edge_lora.combine import METHODS, CombineConfig, Source, combine_to_file, file_digest
from edge_lora.errors import EdgeLoraError


def add_combine_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "combine",
        parents=[common],
        help="combine adapters into one (PEFT's add_weighted_adapter methods)",
        description="Combine adapters for one base into one adapter file, by any method of PEFT's "
        "add_weighted_adapter. cat is exact: the result runs like the stacked set.",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        required=True,
        metavar="PATH[:WEIGHT]",
        help="an edge-lora adapter .safetensors or a PEFT directory, weight 1.0 unless given; repeatable",
    )
    p.add_argument("--weights", help="comma list of weights, one per --adapter (instead of PATH:WEIGHT)")
    p.add_argument("--method", default="cat", help=f"one of {', '.join(METHODS)} (default cat)")
    p.add_argument("--out", required=True, help="the combined adapter .safetensors to write")
    p.add_argument("--rank", type=int, help="svd methods: the result's rank (default the largest input rank)")
    p.add_argument("--density", type=float, help="ties, dare, magnitude_prune: the fraction kept, (0, 1]")
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="TIES sign rule")
    p.add_argument("--clamp", type=float, help="svd methods: clamp the factors at this quantile, (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="DARE's random masks (default 0)")
    p.add_argument("--base", help="a bundle or model directory to check the inputs against (and PEFT dirs)")
    p.set_defaults(func=run_combine)


def path_and_weight(spec: str) -> tuple[str, float | None]:
    """``path[:weight]``; a colon not followed by a number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, None


def source_specs(specs: list[str], weights: str | None) -> list[tuple[str, float]]:
    """``[(path, weight)]`` from ``--adapter`` specs and an optional ``--weights`` list."""
    parsed = [path_and_weight(s) for s in specs]
    if weights is not None:
        try:
            listed = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise EdgeLoraError(f"--weights {weights!r} is not a comma list of numbers") from None
        if len(listed) != len(parsed):
            raise EdgeLoraError(
                f"--weights gives {len(listed)} weights for {len(parsed)} adapters",
                hint="give one weight per --adapter",
            )
        if any(w is not None for _, w in parsed):
            raise EdgeLoraError("weights given twice (PATH:WEIGHT and --weights)", hint="use one of the two")
        parsed = [(p, w) for (p, _), w in zip(parsed, listed)]
    out = [(p, 1.0 if w is None else w) for p, w in parsed]
    for p, w in out:
        if not math.isfinite(w):
            raise EdgeLoraError(f"weight {w} is not a finite number", path=p)
    return out


def load_sources(specs: list[tuple[str, float]], base: str | os.PathLike | None = None) -> list[Source]:
    """Each input read (a PEFT directory imported, checked against ``base`` when given)."""
    from edge_lora.adapter import Adapter

    config = fingerprint = base_table = None
    if base is not None:
        config, fingerprint, base_table = _base(Path(base))
    sources = []
    for path, weight in specs:
        p = Path(path)
        if not p.exists():
            raise EdgeLoraError(
                "adapter not found", path=p, hint="pass an adapter .safetensors or a PEFT dir"
            )
        if p.is_dir():
            from converters.peft import WEIGHTS_FILE, import_peft

            adapter = import_peft(p, base=config, base_table=base_table)
            adapter.base_fingerprint = adapter.base_fingerprint or fingerprint  # PEFT records none
            digest = file_digest(p / WEIGHTS_FILE)
        else:
            adapter = Adapter.load(p, base=config, base_fingerprint=fingerprint)
            digest = file_digest(p)
        name = p.name if p.is_dir() else p.stem
        if any(s.name == name for s in sources):
            name = str(p)
        sources.append(Source(name, adapter, weight, path=str(p), info={"sha256": digest}))
    return sources


def _base(base: Path):
    """(config, fingerprint, tied-head check) of a bundle or a model directory."""
    from converters.tied_head import bundle_check, model_dir_check
    from edge_lora.bundle import Bundle
    from edge_lora.model_dir import ModelDir

    if (base / "bundle.json").is_file():
        b = Bundle.open(base)
        return b.config, b.base_fingerprint, bundle_check(b)
    md = ModelDir(base)
    return md.config, md.fingerprint, model_dir_check(md)


def run_combine(args: argparse.Namespace) -> int:
    config = CombineConfig(
        method=args.method,
        rank=args.rank,
        density=args.density,
        majority_sign=args.majority_sign,
        clamp=args.clamp,
        seed=args.seed,
    )
    config.check()  # before any input is read
    out = Path(args.out)
    if out.is_dir():
        raise EdgeLoraError("--out is a directory", path=out, hint="name the .safetensors file to write")
    sources = load_sources(source_specs(args.adapter, args.weights), args.base)
    combined = combine_to_file(sources, config, out)
    ranks = sorted({w.rank for w in combined.modules.values()})
    print(
        f"wrote {out}: {combined.extra['combined']['method']} of {len(sources)} adapters, "
        f"{len(combined.modules)} modules, rank {'/'.join(map(str, ranks))}"
    )
    return 0
