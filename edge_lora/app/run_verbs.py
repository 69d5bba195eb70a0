"""The `run` and `chat` verbs: offline inference over runtime.load (no torch).

    edge-lora run BUNDLE --prompt "..." [--adapter NAME[:SCALE]]... [--backend onnx] [--json]
    echo "..." | edge-lora run BUNDLE
    edge-lora chat BUNDLE [--adapter NAME]      then /adapter NAME[:SCALE] ..., /base, /reset, /quit

An adapter is a name from the bundle or the path of an adapter file (its name is the file stem).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from edge_lora.app.conversation import Conversation
    from runtime.engine import Engine


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder written by `edge-lora export`")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "llamacpp"])
    p.add_argument(
        "--quant", help="which exported base to load (e.g. int4, int8, q4_0, q8_0); default the first"
    )
    p.add_argument("--threads", type=int, help="CPU threads for the backend")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="auto (default): a hardware GPU when the backend finds one, else the CPU; "
        "gpu: fail if there is none",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME[:SCALE]",
        help="adapter from the bundle (or an adapter file) and its scale; repeatable to stack",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=None, help="stop string; repeatable")


def add_run_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run", parents=[common], help="generate text from a bundle (prompt from --prompt or stdin)"
    )
    _engine_arguments(p)
    p.add_argument("--prompt", help="the prompt; read from stdin when absent")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: text, tokens, timings, adapters"
    )
    p.set_defaults(func=run_run)


def add_chat_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "chat", parents=[common], help="interactive generation; /adapter switches adapters mid-conversation"
    )
    _engine_arguments(p)
    p.add_argument(
        "--no-history", action="store_true", help="send each line on its own, without the earlier turns"
    )
    p.set_defaults(func=run_chat)


def parse_adapter_spec(spec: str) -> tuple[str, str | None, float]:
    """``NAME[:SCALE]`` or ``PATH[:SCALE]`` -> (name, path or None, scale)."""
    body, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            scale = float(tail)
            body = head
        except ValueError:
            pass
    if body.endswith(".safetensors") or "/" in body:
        return Path(body).name.removesuffix(".safetensors"), body, scale
    if not body:
        raise EdgeLoraError(f"bad adapter spec {spec!r}", hint="NAME[:SCALE], e.g. --adapter sql:0.8")
    return body, None, scale


def open_engine(args: argparse.Namespace) -> Engine:
    import runtime

    options = {}
    if args.quant:
        options["quant"] = args.quant
    if args.threads:
        options["threads"] = args.threads
    engine = runtime.load(args.bundle, backend=args.backend, device=args.device, **options)
    active = {}
    for spec in args.adapter:
        name, path, scale = parse_adapter_spec(spec)
        if name not in engine.adapters:
            engine.add_adapter(name, path)
        active[name] = active.get(name, 0.0) + scale
    engine.set_adapters(active)
    return engine


def _sampling(args: argparse.Namespace, stop_default: list[str] | None = None) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop if args.stop is not None else (stop_default or []),
    )


def run_run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise EdgeLoraError("empty prompt", hint="pass --prompt TEXT or pipe text on stdin")
    start = time.perf_counter()
    engine = open_engine(args)
    loaded = time.perf_counter()
    if args.json:
        text = engine.generate(prompt, **_sampling(args))
        done = time.perf_counter()
        tokenizer = engine.tokenizer_for()  # the active adapters' new tokens count as one token each
        n_tokens = len(tokenizer.encode(text, add_special_tokens=False)) if text else 0
        info = engine.info()
        print(
            json.dumps(
                {
                    "text": text,
                    "prompt": prompt,
                    "backend": engine.backend_name,
                    "device": info["device"],
                    "adapters": info["active"],
                    "new_tokens": n_tokens,
                    "load_s": round(loaded - start, 4),
                    "generate_s": round(done - loaded, 4),
                }
            )
        )
        return 0
    for chunk in engine.generate(prompt, stream=True, **_sampling(args)):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_HELP = (
    "commands: /adapter NAME[:SCALE] ... (switch; several = stack), /base (no adapter), "
    "/adapters (list), /reset, /quit"
)


def run_chat(args: argparse.Namespace) -> int:
    from edge_lora.app.conversation import Conversation

    engine = open_engine(args)
    chat = Conversation(engine, keep_history=not args.no_history)
    interactive = sys.stdin.isatty()
    say = (lambda text: print(text, file=sys.stderr)) if interactive else (lambda text: print(text))
    say(
        f"edge-lora chat on {engine.backend_name} ({engine.info()['device']['name']}), {chat.mode}; "
        f"bundle adapters: {', '.join(engine.bundle.adapters) or 'none'}"
    )
    say(CHAT_HELP)
    sampling = _sampling(args, stop_default=chat.stop_text)
    sampling["stop_token_ids"] = chat.stop_ids
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.rstrip("\n")
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            try:
                _chat_command(engine, chat, command, rest.split(), say)
            except EdgeLoraError as err:  # a typo in a command must not end the conversation
                say(f"error: {err}")
            continue
        reply = ""
        for chunk in engine.generate(chat.prompt(line), stream=True, **sampling):
            reply += chunk
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        chat.record(line, reply)


def _chat_command(
    engine: Engine, chat: Conversation, command: str, words: list[str], say: Callable[[str], None]
) -> None:
    if command == "/adapter":
        active = {}
        for spec in words:
            name, path, scale = parse_adapter_spec(spec)
            if name not in engine.adapters:
                engine.add_adapter(name, path)
            active[name] = scale
        engine.set_adapters(active)
        say(f"adapters: {active or 'none (base)'}")
    elif command == "/base":
        engine.set_adapters({})
        say("adapters: none (base)")
    elif command == "/adapters":
        say(
            f"loaded: {engine.adapters or 'none'}; in bundle: {list(engine.bundle.adapters)}; "
            f"active: {engine.info()['active']}"
        )
    elif command == "/reset":
        chat.reset()
        say("history cleared")
    else:
        say(CHAT_HELP)
