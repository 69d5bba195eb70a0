"""An IoT board's inference service: a bundle, the runtime alone (no torch), an adapter per request.

Install on the board only what it needs -- `pip install 'edge-lora[onnx]'` (or `[llama]`) -- copy
the bundle over, and run:

    python iot_device.py BUNDLE < requests.jsonl        # one JSON request per line
    python iot_device.py BUNDLE --prompt "shift: c a t ="  # the same prompt under each adapter

A request is ``{"prompt": "...", "adapter": "shift" | null, "max_new_tokens": 16}``; the reply is
one JSON line with the text, the adapter and the latency. All of the bundle's adapters are loaded
once at start; switching between them costs nothing per request (no reload, no re-merge).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import runtime
from edge_lora.errors import EdgeLoraError


def serve(engine, requests, out) -> None:
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            adapter = request.get("adapter")
            start = time.perf_counter()
            text = engine.generate(
                request["prompt"],
                max_new_tokens=int(request.get("max_new_tokens", 16)),
                adapters={adapter: 1.0} if adapter else {},
                stop=request.get("stop", ["\n"]),
            )
            reply = {"adapter": adapter, "text": text, "ms": round(1000 * (time.perf_counter() - start), 2)}
        except (
            EdgeLoraError,
            KeyError,
            ValueError,
            TypeError,
        ) as err:  # a bad request must not stop the service
            reply = {"error": str(err)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="serve a bundle with per-request adapters (no torch)")
    parser.add_argument("bundle")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "llamacpp"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", help="demo: run this prompt on the base and under each adapter")
    args = parser.parse_args(argv)
    try:
        engine = runtime.load(args.bundle, backend=args.backend, threads=args.threads)
        for name in engine.bundle.adapters:
            engine.add_adapter(name)  # hash-checked against bundle.json, base fingerprint checked
        if args.prompt is not None:
            demo = [json.dumps({"prompt": args.prompt, "adapter": a}) for a in [None, *engine.adapters]]
            serve(engine, demo, sys.stdout)
        else:
            serve(engine, sys.stdin, sys.stdout)
    except EdgeLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
