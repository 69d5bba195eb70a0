"""How decode speed and memory grow with adapter rank, adapters loaded, adapters stacked and context.

Runs inside an engine worker (benchmarks.worker, op "scaling") on edge-lora's own engine; the
runner hands it the adapter files (random all-linear adapters, benchmarks.models.extra_adapter).
Each point is the best of ``repeats`` greedy requests (one point is one configuration, so rounds
cannot pair it; best-of is the least noisy single number on a shared CPU).
"""

from __future__ import annotations

import time

from benchmarks.worker import prompt_ids, rss


def ready_for(engine, name: str) -> None:
    """The first request's setup with adapter ``name``, without decoding."""
    state = engine._new_state(*engine._request_set({name: 1.0}))
    if hasattr(state, "adapter_set"):  # llama.cpp applies the set on the first feed: do it here
        with engine._ctx_lock:
            engine._use_set(state.adapter_set, state.loaded)
    state.close()


def add_adapter_ms(engine, path: str) -> dict:
    """Adding an adapter file to a loaded engine, then the first request's setup with it (ms)."""
    t0 = time.perf_counter()
    engine.add_adapter("extra", path)
    added = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    ready_for(engine, "extra")
    ready = (time.perf_counter() - t1) * 1e3
    engine.remove_adapter("extra")
    # an adapter the bundle ships (hash checked; llama.cpp gets its GGUF twin instead of converting)
    engine.remove_adapter("b")
    t2 = time.perf_counter()
    engine.add_adapter("b")
    ready_for(engine, "b")
    bundled = (time.perf_counter() - t2) * 1e3
    return {
        "add_adapter_ms": added,
        "first_request_setup_ms": ready,
        "add_to_ready_ms": added + ready,
        "add_bundled_to_ready_ms": bundled,
    }


def _rate(worker, adapters: dict, prompt_len: int, new_tokens: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        best = max(best, worker.request(adapters, prompt_ids(prompt_len), new_tokens)["tok_s"])
    return best


def sweep(worker, cmd: dict) -> dict:
    """``cmd``: ranks {rank: file}, loaded [files], stacked [k...], contexts [L...], prompt, new_tokens,
    repeats; ``sweeps`` (optional) names the ones to run (rank, loaded, stacked, context), all by default."""
    engine, out = worker.engine, {}
    p, n, reps = cmd["prompt"], cmd["new_tokens"], cmd["repeats"]
    only = set(cmd.get("sweeps") or ("rank", "loaded", "stacked", "context"))
    out["base_tok_s"] = _rate(worker, {}, p, n, reps)
    out["base_rss"] = rss()
    rows = []
    for rank, path in sorted(cmd["ranks"].items(), key=lambda kv: int(kv[0])) if "rank" in only else []:
        name = f"rank{rank}"
        engine.add_adapter(name, path)
        rows.append({"rank": int(rank), "tok_s": _rate(worker, {name: 1.0}, p, n, reps), **rss()})
        engine.remove_adapter(name)
    out["rank"] = rows
    rows, names = [], []
    counts = sorted(set(cmd["loaded_counts"]))
    for i, path in enumerate(cmd["loaded"] if only & {"loaded", "stacked"} else []):
        names.append(f"loaded{i}")
        engine.add_adapter(names[-1], path)
        if len(names) in counts:
            # every loaded adapter used by one request in turn (their per-set state is built), one timed
            for other in names:
                engine._new_state(*engine._request_set({other: 1.0})).close()
            rows.append({"loaded": len(names), "tok_s": _rate(worker, {names[0]: 1.0}, p, n, reps), **rss()})
    out["loaded"] = rows
    rows = []
    for k in cmd["stacked"] if "stacked" in only else []:
        rows.append({"stacked": k, "tok_s": _rate(worker, {m: 1.0 for m in names[:k]}, p, n, reps)})
    out["stacked"] = rows
    for name in names:
        engine.remove_adapter(name)
    rows = []
    for length in cmd["contexts"] if "context" in only else []:
        rows.append(
            {
                "context": length,
                "base_tok_s": _rate(worker, {}, length, n, reps),
                "adapter_tok_s": _rate(worker, {"a": 1.0}, length, n, reps),
                **rss(),
            }
        )
    out["context"] = rows
    return out
