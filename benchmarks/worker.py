"""One engine in its own process, driven line by line by the runner (JSON in, JSON out).

Each worker loads one engine once (ours or a peer), then answers commands:

    {"op": "decode", "case": "a"}     one greedy request: prompt prefill, then timed decode steps
    {"op": "extras"}                  swap latency, first step after a swap, adding an adapter
    {"op": "scaling", ...}            the scaling sweeps (see benchmarks.scaling)
    {"op": "workload", ...}           requests taking turns between adapters (benchmarks.workload_bench)
    {"op": "rss"}                     current and peak resident memory of this process
    {"op": "quit"}

A process per engine keeps memory numbers clean and lets the runner interleave every engine in
rounds (the machine drifts by tens of percent between minutes). Cases: "base" (no adapter), "a"
(one rank-16 adapter, unmerged), "ab" (two stacked), "merged" (a worker whose engine merged "a").
Kind "native" is the C library (benchmarks.native_bench.NativeWorker); kinds "workload-*" are the
workload's engines (benchmarks.workload_engines).

    python -m benchmarks.worker '{"kind": "ours-onnx", ...}'   (the runner starts these)
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks.probes import add_adapter_ms, prompt_ids, ready_for, rss, swap_steps

STARTED = time.time()
CASE_SETS = {"base": {}, "merged": {}, "a": {"a": 1.0}, "ab": {"a": 1.0, "b": 1.0}}


# --- our engines ----------------------------------------------------------------------


class Ours:
    """edge-lora's runtime (ONNX Runtime or llama.cpp backend) through its own decode state."""

    def __init__(self, spec: dict):
        import runtime

        self.backend = spec["backend"]
        options = {"quant": spec["quant"], "threads": spec["threads"]}
        if self.backend == "llamacpp":
            options["n_ctx"] = spec.get("n_ctx", 2048)
        else:
            # speed rows: base-only requests on the plain graph, as the per-token adapter cost is measured
            # against it (the default CPU engine moves them to the LoRA graph's rank-0 path once an adapter
            # is loaded: one copy of the weights, 1-5% slower); memory rows come from the cold-start workers
            options["plain_session"] = spec.get("plain_session", True)
        t0 = time.perf_counter()
        self.engine = runtime.load(spec["bundle"], backend=self.backend, **options)
        self.load_s = time.perf_counter() - t0
        for name in spec.get("adapters", ["a", "b"]):
            self.engine.add_adapter(name)
        self.merge_quality = None
        if spec.get("merged"):
            prompt = prompt_ids(spec.get("prompt", 64))
            before = (
                self.engine.logits(prompt, adapters={}),
                self.engine.logits(prompt, adapters={"a": 1.0}),
            )
            self.engine.merge("a")
            from benchmarks.gguf_merge import merge_quality  # merged vs unmerged logits, same engine

            self.merge_quality = merge_quality(self.engine.logits(prompt, adapters={}), before[1], before[0])
        self.spec = spec

    def decode(self, case: str, prompt: list[int], new_tokens: int) -> dict:
        return self.request(CASE_SETS[case], prompt, new_tokens)

    def request(self, adapters: dict, prompt: list[int], new_tokens: int) -> dict:
        """One greedy request through the engine's decode state (the ONNX / llama.cpp benchmarks' own
        loop)."""
        if self.backend == "onnx":
            from benchmarks.onnx_bench import _one_request
        else:
            from benchmarks.gguf_bench import _one_request
        prefill, rate = _one_request(self.engine, prompt, new_tokens, adapters)
        return {"tok_s": rate, "prefill_ms": prefill * 1e3}

    def extras(self, swaps: int) -> dict:
        out = swap_steps(self.engine, self.backend, swaps)
        out.update(add_adapter_ms(self.engine, self.spec["extra_adapter"]))
        return out


def cold_start(spec: dict) -> dict:
    """A fresh process: imports, load, one adapter, first token; then peak memory after a request."""
    t_import = time.perf_counter()
    import runtime

    t0 = time.perf_counter()
    options = {"quant": spec["quant"], "threads": spec["threads"]}
    if "plain_session" in spec:
        options["plain_session"] = spec["plain_session"]
    options.update(spec.get("engine_options", {}))  # a lever under test (benchmarks.gguf_bench --memory)
    engine = runtime.load(spec["bundle"], backend=spec["backend"], **options)
    t1 = time.perf_counter()
    loaded = rss()  # the weights as the backend holds them (the report's "why" for the peak)
    first = engine.generate_ids(prompt_ids(8), _params(1), adapters={})
    t2 = time.perf_counter()
    after_load = rss()
    # ONNX opens its LoRA graph (in place of the plain one, on the CPU) on a thread: not the adapter's cost
    getattr(engine, "prepare_for_adapters", lambda: None)()
    t3 = time.perf_counter()
    engine.add_adapter("a")  # the first add in this process: read, hash checked, parsed, given to the backend
    ready_for(engine, "a")
    first_add_ms = (time.perf_counter() - t3) * 1e3
    added = rss()
    engine.generate_ids(prompt_ids(spec["prompt"]), _params(spec["new_tokens"]), adapters={"a": 1.0})
    info = engine.info()
    return {
        "process_to_first_token_s": time.time() - STARTED - (time.perf_counter() - t2),
        "import_s": t0 - t_import,
        "load_s": t1 - t0,
        "load_to_first_token_s": t2 - t0,
        "first_token": first[:1],
        "rss_after_first_token_mb": after_load["rss_mb"],
        "first_add_ms": first_add_ms,
        "rss_after_load_mb": loaded["rss_mb"],
        "peak_after_load_mb": loaded["peak_rss_mb"],
        "rss_after_adapter_mb": added["rss_mb"],
        "peak_after_adapter_mb": added["peak_rss_mb"],  # ONNX: the LoRA graph's open included
        "backend": spec["backend"],
        "quant": spec["quant"],
        "plain_session": info.get("plain_session"),
        "session_api": info.get("session_api"),
        "n_ctx": info.get("n_ctx"),
        "kv_positions": info.get("kv_positions"),
        "mmap": info.get("mmap"),
        # KV the prefix store keeps for later requests (runtime.prefix_cache): part of the footprint
        "prefix_store_mb": ((info.get("prefix_cache") or {}).get("bytes") or 0) / 1e6,
        **rss(),
    }


def _params(n: int):
    from runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n)


def baseline_rss(backend: str | None = None) -> dict:
    """What the interpreter and the engine libraries hold before any model: subtracted in the report.
    ``backend``: only that backend's libraries, as a process running it holds them (llama.cpp's
    backend registry loaded: its CPU and GPU backends' code and their drivers, ~40 MB here)."""
    import runtime  # noqa: F401

    if backend in (None, "onnx"):
        import onnxruntime  # noqa: F401
    if backend in (None, "llamacpp"):
        import llama_cpp  # noqa: F401
    if backend == "llamacpp":
        from runtime.llamacpp import lib as llamacpp_lib

        llamacpp_lib.silence_log(False)  # what every engine does first: llama_backend_init, the log callback
    return rss()


# --- the peers ------------------------------------------------------------------------


def _worker(spec: dict):
    kind = spec["kind"]
    if kind.startswith("ours-"):
        return Ours(spec)
    if kind == "native":  # the C library through runtime/native.py (benchmarks.native_bench)
        from benchmarks.native_bench import NativeWorker

        return NativeWorker(spec)
    if kind.startswith("workload-"):
        from benchmarks.workload_engines import make

        return make(spec)
    from benchmarks import peers

    return peers.make(spec)


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec["kind"] == "cold":
        print(json.dumps(cold_start(spec)), flush=True)
        return 0
    if spec["kind"] == "baseline":
        print(json.dumps(baseline_rss(spec.get("backend"))), flush=True)
        return 0
    if spec["kind"] == "gpu":
        from benchmarks.gpu_bench import measure

        print(
            json.dumps(measure(spec["bundle"], spec["tokens"], spec["prompt"], spec["threads"])), flush=True
        )
        return 0
    if (
        spec["kind"] == "bandwidth"
    ):  # its GB-sized buffer stays out of the runner (children would inherit its peak)
        from benchmarks import roofline

        print(
            json.dumps(roofline.measure(spec["threads"], spec["quick"], spec["working_set_mb"])), flush=True
        )
        return 0
    worker = _worker(spec)
    prompt = prompt_ids(spec["prompt"])
    quality = getattr(worker, "merge_quality", None)
    ready = {"ready": True, "load_s": getattr(worker, "load_s", None), **rss()}
    print(json.dumps({**ready, **({"merge_quality": quality} if quality else {})}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "decode":
                out = worker.decode(cmd["case"], prompt, spec["new_tokens"])
            elif op == "extras":
                out = worker.extras(cmd.get("swaps", 50))
            elif op == "scaling":
                from benchmarks.scaling import sweep

                out = sweep(worker, cmd)
            elif op == "workload":
                out = worker.workload(cmd)
            elif op == "rss":
                out = rss()
            elif op == "quit":
                return 0
            else:
                out = {"error": f"unknown op {op}"}
        except (
            Exception
        ) as err:  # report it to the runner and stay alive: one failed case is not a failed run
            out = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
