"""The `edge-lora` command: thin verbs over the Python API.

    edge-lora train ...                   LoRA training on the host (PyTorch)
    edge-lora export MODEL --out BUNDLE   quantized base + adapters for ONNX Runtime and llama.cpp
    edge-lora import-gguf FILE --out DIR  a GGUF base (llama, qwen2) as a Hugging Face model directory
    edge-lora run BUNDLE --prompt ...     offline inference with the runtime (no torch)
    edge-lora chat BUNDLE                 interactive, /adapter switches adapters mid-conversation
    edge-lora inspect PATH                what a bundle, adapter, PEFT dir, model dir or GGUF is
    edge-lora merge MODEL ADAPTER --out   fold adapters into a Hugging Face model directory
    edge-lora combine --adapter A:W ...   several adapters into one (PEFT's add_weighted_adapter methods)
    edge-lora bench ...                   the benchmark runner
    edge-lora quickstart                  the whole mission on the shipped model, in one command

Errors print one line (``error: <file>: <what> (hint: <what to do>)``) and exit 2; anything
unexpected prints one line and exits 1; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from edge_lora import __version__
from edge_lora.errors import EdgeLoraError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    parser = argparse.ArgumentParser(
        prog="edge-lora", description="LoRA from a training notebook to a phone or a board.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"edge-lora {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    from edge_lora.app.combine_verb import add_combine_arguments
    from edge_lora.app.export_verbs import add_export_arguments
    from edge_lora.app.handoff_verbs import add_bench_arguments, add_quickstart_arguments, add_train_arguments
    from edge_lora.app.import_verb import add_import_arguments
    from edge_lora.app.inspect_verb import add_inspect_arguments
    from edge_lora.app.merge_verb import add_merge_arguments
    from edge_lora.app.run_verbs import add_chat_arguments, add_run_arguments

    for add in (
        add_train_arguments,
        add_export_arguments,
        add_import_arguments,
        add_run_arguments,
        add_chat_arguments,
        add_inspect_arguments,
        add_merge_arguments,
        add_combine_arguments,
        add_bench_arguments,
        add_quickstart_arguments,
    ):
        add(sub, common)
    try:
        from edge_lora.app.sign_verbs import add_sign_arguments
    except ImportError:  # signing needs the optional `cryptography`; the other verbs do not
        pass
    else:
        add_sign_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        if argv and argv[0] in ("train", "bench"):  # these parse their own flags, --help included
            from edge_lora.app import handoff_verbs

            run = handoff_verbs.run_train if argv[0] == "train" else handoff_verbs.run_bench
            return int(run(argparse.Namespace(rest=argv[1:], verbose=verbose)) or 0)
        parser = build_parser()
        args = parser.parse_args(argv)
        verbose = getattr(args, "verbose", verbose)
        return int(args.func(args) or 0)
    except EdgeLoraError as err:
        _report(f"error: {err}", verbose)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-lora run ... | head`: the reader left, nothing went wrong
        return 0
    except SystemExit as exit_:  # argparse: usage errors already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USER_ERROR
    except Exception as err:  # a bug or a library failure we did not translate: one line, details on request
        first = (str(err).strip().splitlines() or [""])[0][:300]
        _report(
            f"error: {type(err).__name__}: {first}"
            + ("" if verbose else " (run with --verbose for the traceback)"),
            verbose,
        )
        return EXIT_INTERNAL_ERROR


def _report(line: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
