"""Measurements on one loaded engine, shared by the engine worker (benchmarks.worker), the sweeps
(benchmarks.scaling) and the backends' own benchmarks: resident memory, the fixed random prompt, a
swap between adapters, adding one. They drive the engines through their request setup
(``_request_set`` / ``_new_state``), the same path a request takes.
"""

from __future__ import annotations

import time

import numpy as np


def rss() -> dict:
    """Resident memory now and at its peak (VmHWM: unlike ru_maxrss it does not carry the parent's peak
    over exec)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024,
    }


def prompt_ids(length: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(3, 250, length)]


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


def swap_steps(engine, backend: str, n: int) -> dict:
    """Requests alternating adapters a / b: the swap itself, then the first decode step after it
    against the next (steady) step, each after an 8-token prompt."""
    swaps, first, steady = [], [], []
    for i in range(n):
        chosen = {"a": 1.0} if i % 2 else {"b": 1.0}
        t0 = time.perf_counter()
        state = engine._new_state(*engine._request_set(chosen))
        if (
            backend == "llamacpp"
        ):  # the set is applied on a request's first feed: apply it here, under the timer
            with engine._ctx_lock:
                engine._use_set(state.adapter_set, state.loaded)
        swaps.append((time.perf_counter() - t0) * 1e3)
        state.feed([5, 6, 7, 8, 9, 10, 11, 12])
        t1 = time.perf_counter()
        state.feed([13])
        first.append((time.perf_counter() - t1) * 1e3)
        t2 = time.perf_counter()
        state.feed([14])
        steady.append((time.perf_counter() - t2) * 1e3)
        state.close()
    return {
        "swap_p50_ms": float(np.percentile(swaps, 50)),
        "swap_p99_ms": float(np.percentile(swaps, 99)),
        "first_step_after_swap_ms": float(np.median(first)),
        "steady_step_ms": float(np.median(steady)),
        "first_over_steady": float(np.median(np.array(first) / np.array(steady))),
    }


def load_average() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages (empty where /proc has none): every report says
    how busy the machine was, since speed rows mean little on a loaded one."""
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []
