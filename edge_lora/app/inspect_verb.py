"""The `inspect` verb.

    edge-lora inspect PATH [--base BUNDLE|MODEL_DIR] [--json]

An adapter is read with adding's own checks (edge_lora/token_rows.py among them): a broken one exits 2
with the one-line error adding gives. With ``--base`` it is also judged as adding to that base judges
it; where it does not fit, the same one line goes to stderr and the exit code is 3.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    if info.get("fits", True):
        return 0
    print(f"error: {info['why']}", file=sys.stderr)  # what adding it would print
    return EXIT_DOES_NOT_FIT
