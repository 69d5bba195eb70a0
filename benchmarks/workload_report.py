"""The multi-adapter workload's numbers (benchmarks.workload_bench): per-round means and their medians,
the best peer's time over ours paired per round, greedy agreement with the peer on the same file, the
targets and the Summary's table."""

from __future__ import annotations

import numpy as np

from benchmarks.pool import median, paired_ratio

GOAL_WALL, GOAL_TTFT = 2.0, 5.0  # best peer / ours: time per request, time to first token after a switch
OURS = "edge-lora"
ALORA = "activated adapters (aLoRA)"  # the label suffix of ours with the adapters made activated


def mean_ms(out: dict, key: str, pick: list[bool] | None = None) -> float | None:
    rows = out.get("requests") or []
    values = [r[key] for i, r in enumerate(rows) if pick is None or pick[i]]
    return float(np.mean(values)) if values else None


def summarize(section: dict) -> dict:
    """Per engine and round: mean wall ms per request, mean time to first token after a switch (each
    adapter's first request left out) and for those first requests; their medians over rounds; the best
    peer's time over ours, paired per round; the token agreement with the peer on the same file. The
    requests' tokens are dropped from the stored rounds afterwards (their counts kept)."""
    firsts = section["first_of_adapter"]
    later = [not f for f in firsts]
    per_round: dict[str, dict[str, list]] = {}
    for label, engine in section["engines"].items():
        outs = engine["rounds"]
        per_round[label] = {
            "wall_ms": [mean_ms(o, "wall_ms") for o in outs],
            "ttft_switch_ms": [mean_ms(o, "ttft_ms", later) for o in outs],
            "ttft_first_ms": [mean_ms(o, "ttft_ms", firsts) for o in outs],
        }
    section["per_round"] = per_round
    section["medians"] = {label: {k: median(v) for k, v in m.items()} for label, m in per_round.items()}
    section["agreement"] = agreement(section)
    peers = [label for label in per_round if not label.startswith(OURS)]
    section["ratios"] = {}
    for label in [x for x in per_round if x.startswith(OURS)]:
        row = {}
        for key, name in (("wall_ms", "wall"), ("ttft_switch_ms", "ttft")):
            best = _best_peer(section["medians"], peers, key)
            row[f"{name}_peer"] = best
            row[f"{name}_x"] = paired_ratio(per_round[best][key], per_round[label][key]) if best else None
        section["ratios"][label] = row
    for engine in section["engines"].values():
        for out in engine["rounds"]:
            for r in out.get("requests") or []:
                r["tokens"] = len(r["tokens"]) if isinstance(r["tokens"], list) else r["tokens"]
    return section


def _best_peer(medians: dict, peers: list[str], key: str) -> str | None:
    timed = [p for p in peers if medians[p].get(key)]
    return min(timed, key=lambda p: medians[p][key]) if timed else None


def agreement(section: dict) -> dict:
    """Ours against the peer running the same file, request by request over every round: the share whose
    first token is equal, and whose tokens are all equal."""
    out = {}
    engines = section["engines"]
    pairs = [
        (f"{OURS} onnx {section['onnx_quant']}", f"ORT GenAI on our {section['onnx_quant']}"),
        (f"{OURS} llama.cpp {section['gguf_quant']}", f"llama.cpp {section['gguf_quant']}"),
    ]
    for ours, peer in pairs:
        if ours not in engines or peer not in engines:
            continue
        first = same = n = 0
        for a, b in zip(engines[ours]["rounds"], engines[peer]["rounds"]):
            for x, y in zip(a.get("requests") or [], b.get("requests") or []):
                if not isinstance(x["tokens"], list) or not isinstance(y["tokens"], list):
                    continue
                n += 1
                first += x["tokens"][:1] == y["tokens"][:1]
                same += x["tokens"] == y["tokens"]
        if n:
            out[f"{ours} vs {peer}"] = {"requests": n, "first_token": first / n, "all_tokens": same / n}
    return out


def targets(section: dict) -> list[dict]:
    """Per engine of ours: the workload's two targets against the best peer (benchmarks.target_checks).
    Ours with activated adapters get lines of their own, marked informative: their requests end with an
    invocation the peers' do not, and the peers are the ordinary workload's."""
    out = []
    for label, r in (section.get("ratios") or {}).items():
        activated = label.endswith(ALORA)
        for key, goal, what in (
            ("wall", GOAL_WALL, "time per request"),
            ("ttft", GOAL_TTFT, "time to first token after a switch"),
        ):
            value = r.get(f"{key}_x")
            name = f"workload: {what}, best peer / ours ({label})"
            detail = f"vs {r.get(f'{key}_peer')}; {_workload_line(section)}"
            if activated:
                name = (
                    f"workload with {ALORA}, informative: {what}, best peer of the ordinary workload / "
                    f"ours ({label})"
                )
                detail = f"informative, not the issue's target (the peers ran ordinary adapters); {detail}"
            out.append(
                {
                    "target": name,
                    "value": value,
                    "goal": f">= {goal:g}",
                    "met": value is not None and value >= goal,
                    "detail": detail,
                }
            )
    return out


def _workload_line(section: dict) -> str:
    return (
        f"system prompt {section['system']} tokens, {len(section['adapters'])} adapters taking turns, "
        f"{section['requests']} requests of {section['new_tokens']} new tokens, {section['rounds']} rounds"
    )


def fmt(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(shape: str, section: dict) -> list[str]:
    """The Summary's "<shape>: workload" table: per engine, mean ms per request, time to first token
    after a switch and for each adapter's first request, the ratios to the best peer, the prefix store."""
    if "error" in section:
        return [f"### {shape}: workload", "", f"Failed: {section['error'][-300:]}", ""]
    lines = [
        f"### {shape}: workload (one system prompt, adapters taking turns)",
        "",
        f"{_workload_line(section)}; user turns of {section['user']} tokens, greedy, {section['threads']} "
        "threads, each engine in its own process, engines rotated per round (medians of per-round means). "
        "TTFT after a switch leaves out each adapter's first request of a round (its system prompt is in "
        "no store yet; column 'first'); ms per request counts every request. x = best peer's time / ours, "
        "paired per round."
        + (
            f" Rows '..., {ALORA}': ours with the same adapters made activated (each request's prompt "
            "followed by its adapter's invocation, "
            + ", ".join(f"{n}: {list(t)}" for n, t in (section.get("invocations") or {}).items())
            + "), so the system prompt's KV is the base's and shared by all three; x against the ordinary "
            "workload's best peer (the peers have no activated adapters here)."
            if any(label.endswith(ALORA) for label in section.get("medians", {}))
            else ""
        )
        + " Positions evaluated: llama.cpp's, prompts and new tokens, per round (the round's prompts hold "
        f"{section['requests'] * (section['system'] + section['user'])} before any invocation; what the "
        "context and the prefix store held was not evaluated again).",
        "",
        "| engine | ms per request | x | TTFT ms after a switch | x | TTFT ms, first | prefix store hits "
        "| positions evaluated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    med, ratios = section["medians"], section.get("ratios", {})
    for label, m in med.items():
        r = ratios.get(label, {})
        rounds = section["engines"][label]["rounds"]
        hits, evaluated = _hits(rounds), median([o.get("evaluated_positions") for o in rounds])
        lines.append(
            f"| {label} | {fmt(m['wall_ms'])} | {fmt(r.get('wall_x'), 2) if r else ''} | "
            f"{fmt(m['ttft_switch_ms'])} | {fmt(r.get('ttft_x'), 2) if r else ''} | "
            f"{fmt(m['ttft_first_ms'])} | {hits} | {'' if evaluated is None else fmt(evaluated)} |"
        )
    for pair, a in section.get("agreement", {}).items():
        lines.append("")
        lines.append(
            f"Greedy tokens, {pair}: first token equal in {100 * a['first_token']:.0f}% of {a['requests']} "
            f"requests, all tokens in {100 * a['all_tokens']:.0f}%."
        )
    for label, err in (section.get("errors") or {}).items():
        lines.append(f"{label} did not run: {str(err).splitlines()[-1][:200]}")
    return lines + [""]


def _hits(rounds: list[dict]) -> str:
    """The prefix store's hits / lookups over every round (ours), or "" (a peer)."""
    stats = [o.get("prefix_cache") for o in rounds if o.get("prefix_cache")]
    if not stats:
        return ""
    hits = sum(s.get("hits", 0) for s in stats)
    return f"{hits} / {hits + sum(s.get('misses', 0) for s in stats)}"
