"""The `inspect` verb.

    edge-lora inspect PATH [--base BUNDLE|MODEL_DIR] [--json]

Exit 3 when ``--base`` is given and the adapter does not fit it.
"""

from __future__ import annotations

import argparse
import json

EXIT_DOES_NOT_FIT = 3


def add_inspect_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="what a bundle, adapter, PEFT dir, model dir or GGUF is and what base it fits",
    )
    p.add_argument("path")
    p.add_argument("--base", help="a bundle or model directory: say whether the adapter fits it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from edge_lora.app.describe import describe, format_text

    info = describe(args.path, args.base)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0 if info.get("fits", True) else EXIT_DOES_NOT_FIT
