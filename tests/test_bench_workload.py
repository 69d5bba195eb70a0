"""The multi-adapter workload rows (benchmarks.workload_bench): the requests it makes, ours giving a fresh
engine's tokens while the prefix store serves the system prompt, the whole section through its worker
processes on a tiny bundle (rows, ratios, agreement, targets, the Summary's table). No timing asserted."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from factories import build_bundle, random_adapter

from benchmarks import workload_bench as wb
from benchmarks import workload_engines, workload_report
from edge_lora.model_dir import ModelDir
from runtime.sampling import SamplingParams

TINY = wb.Workload(system=40, requests=6, new_tokens=6)


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    adapters = {n: random_adapter(md, seed=i + 1, std=0.3) for i, n in enumerate(wb.ADAPTERS)}
    root = tmp_path_factory.mktemp("workload") / "b"
    return build_bundle(
        md.path, root, adapters, backends=("onnx", "gguf"), onnx_quants=("fp32",), gguf_quants=("f32",)
    )


def test_requests_take_turns_after_one_system_prompt():
    reqs = TINY.round(0)
    assert [n for n, _ in reqs] == ["a", "b", "c", "a", "b", "c"]
    assert all(len(ids) == TINY.system + TINY.user for _, ids in reqs)
    system = reqs[0][1][: TINY.system]
    assert all(ids[: TINY.system] == system for _, ids in reqs)
    assert len({tuple(ids[TINY.system :]) for _, ids in reqs}) == len(reqs)  # distinct user turns
    assert TINY.round(1)[0][1][: TINY.system] != system  # a new system prompt per round
    assert TINY.round(0) == reqs
    assert wb.first_of_adapter(reqs) == [True, True, True, False, False, False]
    warm = TINY.warmup()
    assert [n for n, _, _ in warm] == ["a", "a", "b", "c"] and len(warm[0][1]) == TINY.system + TINY.user
    assert all(t >= wb.ID_HIGH for _, ids, _ in warm for t in ids)  # never a prefix of a round's prompt
    # activated adapters: the same prompts, each followed by its adapter's invocation (in no prompt else)
    activated = TINY.round(0, wb.INVOCATIONS)
    assert [(n, ids[: -len(wb.INVOCATIONS[n])]) for n, ids in activated] == reqs
    assert all(tuple(ids[-len(wb.INVOCATIONS[n]) :]) == wb.INVOCATIONS[n] for n, ids in activated)
    assert len(set(wb.INVOCATIONS.values())) == len(wb.ADAPTERS)
    drawn = {t for _, ids in reqs for t in ids} | {t for _, ids, _ in warm for t in ids}
    assert not drawn & {t for inv in wb.INVOCATIONS.values() for t in inv}
    warm = TINY.warmup(wb.INVOCATIONS)
    assert all(tuple(ids[-2:]) == wb.INVOCATIONS[n] for n, ids, _ in warm)


def _engine(bundle, backend: str, **options):
    import runtime

    quant = "fp32" if backend == "onnx" else "f32"
    engine = runtime.load(bundle, backend=backend, quant=quant, threads=1, **options)
    for name in wb.ADAPTERS:
        engine.add_adapter(name)
    return engine


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_ours_gives_a_fresh_engines_tokens_with_the_system_prompt_restored(bundle, backend):
    """Ours with its default prefix store, requests taking turns: each later request of an adapter finds
    the system prompt in the store, and every request's tokens equal a fresh engine's."""
    ours = workload_engines.OursWorkload(_engine(bundle, backend))
    ours.warm(TINY.warmup())
    ours.stats()
    reqs = TINY.round(0)
    out = ours.workload({"requests": reqs, "new_tokens": TINY.new_tokens})
    rows = out["requests"]
    assert [r["adapter"] for r in rows] == [n for n, _ in reqs]
    assert all(0 < r["ttft_ms"] <= r["wall_ms"] for r in rows)
    store = out["prefix_cache"]
    later = sum(not f for f in wb.first_of_adapter(reqs))
    assert store["hits"] >= later and store["tokens_reused"] >= later * TINY.system
    for (name, ids), row in zip(reqs, rows):
        fresh = _engine(bundle, backend)
        want = fresh.generate_ids(ids, SamplingParams(max_new_tokens=TINY.new_tokens), adapters={name: 1.0})
        assert row["tokens"] == want, name


@pytest.fixture(scope="module")
def activated(bundle, tmp_path_factory):
    """The bundle's three adapters made activated (the section's files), adapter -> path."""
    from edge_lora.bundle import Bundle

    files = wb.Files.from_bundle(bundle, "fp32", "f32", wb.ADAPTERS)
    return wb.activated_files(files, Bundle.open(bundle).config, tmp_path_factory.mktemp("activated"))


def _activated_engine(bundle, backend: str, activated: dict, **options):
    import runtime

    quant = "fp32" if backend == "onnx" else "f32"
    engine = runtime.load(bundle, backend=backend, quant=quant, threads=1, **options)
    for name, path in activated.items():
        engine.add_adapter(name, path)
    return engine


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_activated_adapters_give_a_fresh_engines_tokens_on_the_shared_base_prefix(bundle, activated, backend):
    """The aLoRA rows' engine (default settings) on the activated requests: every request's tokens equal a
    fresh engine's (no prefix store); the system prompt is the base's for all three adapters, so on ONNX
    the default store serves it to every request after the round's first, and llama.cpp evaluates no
    request's system prompt but the first one's."""
    from edge_lora.adapter import Adapter

    for name, path in activated.items():
        assert tuple(Adapter.load(path).invocation_tokens) == wb.INVOCATIONS[name]
    ours = workload_engines.OursWorkload(_activated_engine(bundle, backend, activated))
    ours.warm(TINY.warmup(wb.INVOCATIONS))
    ours.stats()
    reqs = TINY.round(0, wb.INVOCATIONS)
    out = ours.workload({"requests": reqs, "new_tokens": TINY.new_tokens})
    rows = out["requests"]
    if backend == "onnx":
        store = out["prefix_cache"]
        assert store["max_bytes"] == wb.default_store_bytes("onnx")
        assert store["hits"] > 0 and store["hits"] >= len(reqs) - 1, store
        assert store["tokens_reused"] >= (len(reqs) - 1) * TINY.system, store
    else:
        prompts = sum(len(ids) for _, ids in reqs)
        generated = sum(len(r["tokens"]) for r in rows)
        # the first request's whole prompt; the others' user turn, invocation and new tokens only
        assert out["evaluated_positions"] <= prompts - (len(reqs) - 1) * TINY.system + generated
    for (name, ids), row in zip(reqs, rows):
        fresh = _activated_engine(bundle, backend, {name: activated[name]}, prefix_cache_bytes=0)
        want = fresh.generate_ids(ids, SamplingParams(max_new_tokens=TINY.new_tokens), adapters={name: 1.0})
        assert row["tokens"] == want, name


def test_the_section_through_its_workers(bundle):
    """Ours on both backends (ordinary and activated adapters) and the two peers, one round in worker
    processes: the stored rows, the per-engine table with its ratios to the best peer, the agreement
    lines, the four targets and the activated rows' four informative lines."""
    files = wb.Files.from_bundle(bundle, "fp32", "f32", wb.ADAPTERS)
    section = wb.run(files, TINY, threads=1, rounds=1, say=lambda _msg: None)
    alora = [
        "edge-lora onnx fp32, activated adapters (aLoRA)",
        "edge-lora llama.cpp f32, activated adapters (aLoRA)",
    ]
    ours = ["edge-lora onnx fp32", alora[0], "edge-lora llama.cpp f32", alora[1]]
    peers = ["llama.cpp f32", "ORT GenAI on our fp32"]
    labels = ours + peers
    assert list(section["engines"]) == labels and section["errors"] == {}
    for label in labels:
        (out,) = section["engines"][label]["rounds"]
        assert [r["adapter"] for r in out["requests"]] == [n for n, _ in TINY.round(0)]
        assert all(isinstance(r["tokens"], int) for r in out["requests"])  # counts kept, ids dropped
        m = section["medians"][label]
        assert m["wall_ms"] > 0 and m["ttft_switch_ms"] > 0 and m["ttft_first_ms"] > 0
        assert ("prefix_cache" in out) == label.startswith("edge-lora")
    (out,) = section["engines"][alora[0]]["rounds"]
    assert out["prefix_cache"]["hits"] >= TINY.requests - 1  # the default store serves the base prefix
    (out,) = section["engines"][alora[1]]["rounds"]  # llama.cpp: the system prompt evaluated once
    prompts = sum(len(ids) for _, ids in TINY.round(0, wb.INVOCATIONS))
    generated = sum(r["tokens"] for r in out["requests"])
    assert out["evaluated_positions"] <= prompts - (TINY.requests - 1) * TINY.system + generated
    assert section["invocations"] == {n: list(t) for n, t in wb.INVOCATIONS.items()}
    for label in ours:
        r = section["ratios"][label]
        assert r["wall_peer"] in peers and r["ttft_peer"] in peers
        best = section["medians"][r["wall_peer"]]["wall_ms"]
        assert best == min(section["medians"][p]["wall_ms"] for p in peers)
        assert r["wall_x"] == pytest.approx(best / section["medians"][label]["wall_ms"])
    assert set(section["agreement"]) == {
        "edge-lora onnx fp32 vs ORT GenAI on our fp32",
        "edge-lora llama.cpp f32 vs llama.cpp f32",
    }
    for a in section["agreement"].values():
        assert a["requests"] == TINY.requests and 0 <= a["all_tokens"] <= a["first_token"] <= 1
    targets = workload_report.targets(section)
    assert len(targets) == 8 and {t["goal"] for t in targets} == {">= 2", ">= 5"}
    assert all(t["met"] == (t["value"] >= float(t["goal"][3:])) for t in targets)
    ordinary = [t for t in targets if t["target"].startswith("workload: ")]
    informative = [t for t in targets if "informative" in t["target"]]
    assert len(ordinary) == len(informative) == 4
    assert not any("aLoRA" in t["target"] for t in ordinary)
    assert all(
        t["target"].endswith(f"({label})") for t, label in zip(informative, [alora[0]] * 2 + [alora[1]] * 2)
    )
    lines = workload_report.markdown("tiny", section)
    assert lines[0] == "### tiny: workload (one system prompt, adapters taking turns)"
    assert sum(line.startswith("| edge-lora") for line in lines) == 4
    assert sum(line.startswith(f"| {label} |") for line in lines for label in alora) == 2
    assert "made activated" in lines[2]
    assert any(line.startswith("Greedy tokens, edge-lora llama.cpp f32 vs llama.cpp f32") for line in lines)


def test_a_store_too_small_for_the_workload_gets_a_sized_row(tmp_path):
    """SmolLM2-135M's shape: the full workload's three prefixes fit both defaults (ONNX 96 MiB of float32
    KV, llama.cpp 64 MiB of f16); a 2048-token system prompt outgrows both, and rows with stores that
    hold it join the default ones."""
    config = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, head_dim=64, eos_token_id=[2])
    per = 30 * 3 * 64 * 2
    assert wb.kv_bytes_per_position(config, "onnx") == per * 4
    assert wb.kv_bytes_per_position(config, "llamacpp") == per * 2
    assert wb.store_states("onnx", 3) == 3 and wb.store_states("llamacpp", 3) == 4
    files = wb.Files.from_bundle(tmp_path, "int4", "q4_0", wb.ADAPTERS)
    full = wb.Workload(system=512, requests=12, new_tokens=64)
    for backend in ("onnx", "llamacpp"):
        assert wb.store_bytes(config, backend, full) <= wb.default_store_bytes(backend)
    assert len(wb.workers(files, full, 2, config)) == 4  # no sized rows
    long = wb.Workload(system=2048, requests=12, new_tokens=64)
    need = 3 * long.positions * per * 4
    sized = {b: wb.store_bytes(config, b, long) for b in ("onnx", "llamacpp")}
    assert sized["onnx"] >= need and sized["onnx"] % (8 << 20) == 0 and sized["onnx"] - need < 8 << 20
    planned = wb.workers(files, long, 2, config)
    assert [w.label for w in planned] == [
        "edge-lora onnx int4",
        f"edge-lora onnx int4, prefix store {sized['onnx'] >> 20} MiB",
        "edge-lora llama.cpp q4_0",
        f"edge-lora llama.cpp q4_0, prefix store {sized['llamacpp'] >> 20} MiB",
        "llama.cpp q4_0",
        "ORT GenAI on our int4",
    ]
    assert planned[1].spec["engine_options"] == {"prefix_cache_bytes": sized["onnx"]}
    assert planned[1].spec["backend"] == "onnx" and "engine_options" not in planned[0].spec


def test_the_store_rule_replays_the_stores_own_eviction():
    """``store_states`` on ONNX against runtime.prefix_cache.PrefixCache itself: each request looks up
    its adapter's prefix and leaves its own state (replacing its set's earlier one); with n states every
    later turn finds the system prompt, with one fewer some do not."""
    from runtime.prefix_cache import PrefixCache

    def later_hits(states: int) -> int:
        cache, hits = PrefixCache(max_bytes=states * 10), 0
        system = tuple(range(100))
        for i in range(12):
            name, ids = "abc"[i % 3], system + (1000 + i, 2000 + i)
            found = cache.best(name, ids, len(ids) - 1)
            hits += i >= 3 and found is not None and found[0] == len(system)
            cache.put(name, ids, None, 10)
        return hits

    n = wb.store_states("onnx", 3)
    assert later_hits(n) == 9 and later_hits(n - 1) < 9


def test_summary_keeps_the_peers_best_and_pairs_rounds():
    """The arithmetic on made-up rounds: per-round means, the first request of each adapter apart, the
    best peer by median, ratios paired per round."""
    firsts = [True, True, False, False]

    def out(wall, ttft):
        return {
            "requests": [
                {"adapter": "a", "wall_ms": w, "ttft_ms": t, "tokens": [1]} for w, t in zip(wall, ttft)
            ]
        }

    engines = {
        "edge-lora onnx int4": [out([10, 10, 4, 4], [8, 8, 1, 1]), out([12, 12, 6, 6], [9, 9, 2, 2])],
        "llama.cpp q4_0": [out([20] * 4, [10] * 4), out([30] * 4, [12] * 4)],
        "ORT GenAI on our int4": [out([40] * 4, [20] * 4), out([40] * 4, [20] * 4)],
    }
    section = workload_report.summarize(
        {
            "first_of_adapter": firsts,
            "onnx_quant": "int4",
            "gguf_quant": "q4_0",
            "engines": {k: {"rounds": v} for k, v in engines.items()},
        }
    )
    ours = section["per_round"]["edge-lora onnx int4"]
    assert ours["wall_ms"] == [7, 9] and ours["ttft_switch_ms"] == [1, 2] and ours["ttft_first_ms"] == [8, 9]
    r = section["ratios"]["edge-lora onnx int4"]
    assert r["wall_peer"] == r["ttft_peer"] == "llama.cpp q4_0"
    assert r["wall_x"] == pytest.approx(np.median([20 / 7, 30 / 9]))
    assert r["ttft_x"] == pytest.approx(np.median([10 / 1, 12 / 2]))
    # ORT GenAI runs ours' file; no llama.cpp engine of ours in this made-up run
    pair = {"requests": 8, "first_token": 1.0, "all_tokens": 1.0}
    assert section["agreement"] == {"edge-lora onnx int4 vs ORT GenAI on our int4": pair}


def test_the_report_carries_the_rows_and_targets():
    """The last full run with a workload section put in: its targets join the shape's targets table and
    its table joins the Summary."""
    import json
    from pathlib import Path

    from benchmarks import report

    stored = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "2026-12-07.json"
    if not stored.is_file():
        pytest.skip("no stored full benchmark run")
    results = json.loads(stored.read_text())
    rows = [{"adapter": "a", "wall_ms": 10.0, "ttft_ms": 2.0, "tokens": [5]}] * 4
    peer = [{"adapter": "a", "wall_ms": 30.0, "ttft_ms": 15.0, "tokens": [5]}] * 4
    section = workload_report.summarize(
        {
            **{k: 1 for k in ("system", "user", "requests", "new_tokens", "rounds", "threads")},
            "adapters": list(wb.ADAPTERS),
            "first_of_adapter": [True, True, True, False],
            "onnx_quant": "int4",
            "gguf_quant": "q4_0",
            "engines": {
                "edge-lora llama.cpp q4_0": {"rounds": [{"requests": rows, "prefix_cache": {"hits": 1}}]},
                "llama.cpp q4_0": {"rounds": [{"requests": peer}]},
            },
        }
    )
    results["models"]["smollm2-135m"]["workload"] = section
    results["summary"] = report.summarize(results)
    targets = {t["target"]: t for t in results["summary"]["models"]["smollm2-135m"]["targets"]}
    wall = targets["workload: time per request, best peer / ours (edge-lora llama.cpp q4_0)"]
    ttft = targets[
        "workload: time to first token after a switch, best peer / ours (edge-lora llama.cpp q4_0)"
    ]
    assert wall["value"] == pytest.approx(3.0) and wall["met"] and wall["goal"] == ">= 2"
    assert ttft["value"] == pytest.approx(7.5) and ttft["met"] and "vs llama.cpp q4_0" in ttft["detail"]
    text = report.summary_markdown(results)
    assert "### smollm2-135m: workload (one system prompt, adapters taking turns)" in text
    assert "| edge-lora llama.cpp q4_0 | 10 | 3.00 | 2 | 7.50 | 2 | 1 / 1 |  |" in text
    assert "qwen2.5-0.5b: workload" not in text  # a shape without the section: no table
