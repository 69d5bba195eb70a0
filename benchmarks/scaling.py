"""How decode speed and memory grow with adapter rank, adapters loaded, adapters stacked and context.

Runs inside an engine worker (benchmarks.worker, op "scaling") on edge-lora's own engine; the
runner hands it the adapter files (random all-linear adapters, benchmarks.models.extra_adapter).
Each point is the best of ``repeats`` greedy requests (one point is one configuration, so rounds
cannot pair it; best-of is the least noisy single number on a shared CPU).
"""

from __future__ import annotations

from benchmarks.probes import prompt_ids, rss


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
