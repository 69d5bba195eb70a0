"""From raw results to numbers a person reads: medians, paired ratios, rooflines, targets.

Labels are "<engine> <quant>[ <variant>]" and cases "base" / "a" (one rank-16 adapter unmerged) /
"ab" (two stacked) / "merged". Rooflines use one byte count per (model, bit width, adapter state)
so every engine is held to the same floor: the GGUF's weights (q4_0 = 4.5 bits, q8_0 = 8.5 bits),
the adapter in fp16 (the smallest form that keeps its accuracy), and an f16 KV cache at the
request's average context.

``summarize`` gives each model's decode rows (against the rooflines) and ``targets``, every target of
the performance issue its numbers can judge; benchmarks.report writes them as markdown.
"""

from __future__ import annotations

import math

from benchmarks import roofline
from benchmarks.memory_budget import (
    backend_of,
    baseline_mb,
    memory_budget_parts,
    memory_why,
    model_config,
    setting,
)
from benchmarks.plan import BITS
from benchmarks.pool import median, paired_ratio

OURS = "edge-lora"


def _bits(label: str) -> int | None:
    for token in label.split("|")[0].split():
        if token in BITS:
            return BITS[token]
    return None


def token_bytes(
    info: dict, plan: dict, bits: int, adapters: int, adapter_bytes_per_value: int = 2
) -> roofline.TokenBytes:
    config = model_config(info["config"])
    quant = {4: "q4_0", 8: "q8_0"}[bits]
    context = plan["prompt"] + plan["new_tokens"] // 2
    return roofline.TokenBytes(
        int(info["files"][quant]["token_weight_mb"] * 1e6),
        roofline.adapter_bytes(config, 16, adapter_bytes_per_value, adapters),
        roofline.kv_bytes(config, context, 2),
    )


def _best(tok_s: dict, keys: list[str]) -> str | None:
    keys = [k for k in keys if k in tok_s and median(tok_s[k])]
    return max(keys, key=lambda k: median(tok_s[k])) if keys else None


def summarize(results: dict) -> dict:
    bw = results.get("bandwidth")  # absent on a run of the quality rows alone
    out = {"models": {}}
    if "rows" in results.get("quality", {}):
        from benchmarks import quality_targets

        out["quality"] = {
            "rows": quality_targets.table(results["quality"]),
            "targets": quality_targets.targets(results["quality"]),
        }
    for shape, info in results.get("models", {}).items():
        tok_s = info["decode"]["tok_s"]
        rows = []
        for key, values in tok_s.items():
            label, case = key.split("|")
            bits = _bits(label)
            row = {
                "engine": label,
                "case": case,
                "tok_s": median(values),
                "runs": values,
                "prefill_ms": median(info["decode"]["prefill_ms"][key]),
            }
            if bits and row["tok_s"]:
                tb = token_bytes(info, results["plan"], bits, {"a": 1, "ab": 2}.get(case, 0))
                ws = bw["working_set_gbs"].get(
                    str(max(16, int(info["files"]["q4_0" if bits == 4 else "q8_0"]["token_weight_mb"])))
                )
                row.update(
                    bits=bits,
                    token_mb=tb.total / 1e6,
                    roofline_tok_s=roofline.roofline_tok_s(bw["dram_gbs"], tb),
                    pct_roofline=100 * row["tok_s"] / roofline.roofline_tok_s(bw["dram_gbs"], tb),
                )
                if ws:
                    row["pct_cache_roofline"] = 100 * row["tok_s"] / roofline.roofline_tok_s(ws, tb)
            rows.append(row)
        out["models"][shape] = {"rows": rows, "targets": targets(results, shape, info)}
    return out


def _target(name: str, value, goal: str, met: bool, detail: str = "") -> dict:
    return {"target": name, "value": value, "goal": goal, "met": met, "detail": detail}


def targets(results: dict, shape: str, info: dict) -> list[dict]:
    """Every target of the performance issue that this model's numbers can judge (4-bit)."""
    tok_s, plan = info["decode"]["tok_s"], results["plan"]
    ours_a = _best(tok_s, [k for k in tok_s if k.startswith(OURS) and _bits(k) == 4 and k.endswith("|a")])
    ours_base = _best(
        tok_s, [k for k in tok_s if k.startswith(OURS) and _bits(k) == 4 and k.endswith("|base")]
    )
    peer_a = _best(tok_s, [k for k in tok_s if _is_peer(k) and _bits(k) == 4 and k.endswith("|a")])
    peer_base = _best(tok_s, [k for k in tok_s if _is_peer(k) and _bits(k) == 4 and k.endswith("|base")])
    out = _versus_peer_targets(tok_s, ours_a, ours_base, peer_a, peer_base)
    if ours_a:
        _adapter_cost_target(out, tok_s, info, plan, ours_a)
    out += _same_graph_targets(tok_s) + _stack_targets(tok_s)
    out += _merged_targets(tok_s, info.get("memory", {}))
    if ours_a and shape.startswith("qwen"):
        tb = token_bytes(info, plan, 4, 1)
        roof = roofline.roofline_tok_s(results["bandwidth"]["dram_gbs"], tb)
        r = median(tok_s[ours_a]) / roof
        out.append(
            _target(
                "0.5B 4-bit with adapter: share of the DRAM roofline",
                r,
                ">= 0.70",
                r >= 0.7,
                f"{ours_a}, roofline {roof:.1f} tok/s",
            )
        )
    return (
        out
        + _swap_and_add_targets(info)
        + _cold_start_targets(results, shape, info)
        + _workload_targets(info)
    )


def _versus_peer_targets(
    tok_s: dict, ours_a: str | None, ours_base: str | None, peer_a: str | None, peer_base: str | None
) -> list[dict]:
    """Our fastest 4-bit engine against the best peer with the adapter, and against ONNX Runtime GenAI's
    own builder without one (our base requests run after adapters were added: the workers add a and b
    first, on one copy of the weights)."""
    out = []
    if ours_a and peer_a:
        r = paired_ratio(tok_s[ours_a], tok_s[peer_a])
        out.append(
            _target(
                "decode with the adapter vs the best peer's unmerged LoRA",
                r,
                ">= 1.3",
                r is not None and r >= 1.3,
                f"{ours_a} vs {peer_a} (peers: llama.cpp with convert_lora_to_gguf.py's f32/f16/q8_0 "
                "files, ORT GenAI)",
            )
        )
    builder = "ORT GenAI builder int4|base"
    if ours_base and builder in tok_s:
        r = paired_ratio(tok_s[ours_base], tok_s[builder])
        out.append(
            _target(
                "base requests (adapters added) vs ORT GenAI builder's base decode",
                r,
                ">= 1.1",
                r is not None and r >= 1.1,
                f"{ours_base} vs {builder} (best peer without an adapter: {peer_base})",
            )
        )
    return out


def _adapter_cost_target(out: list[dict], tok_s: dict, info: dict, plan: dict, ours_a: str) -> None:
    """The adapter's extra time per token on our fastest 4-bit engine against stock llama.cpp's own (its
    cheapest adapter file), appended to ``out``; every peer's cost and the fp16 byte share in the detail."""
    engine = ours_a.split("|")[0]
    r = paired_ratio(tok_s[f"{engine}|base"], tok_s[ours_a])  # time per token with / without
    costs = {}
    for peer in [k for k in tok_s if _is_peer(k) and _bits(k) == 4 and k.endswith("|a")]:
        pb = _peer_base(tok_s, peer)
        pr = paired_ratio(tok_s[pb], tok_s[peer]) if pb else None
        if pr:
            costs[peer.split("|")[0]] = pr - 1
    llama = [v for k, v in costs.items() if k.startswith("llama.cpp")]
    if not r or not llama:
        return
    cheapest = min(llama)
    tb = token_bytes(info, plan, 4, 1)
    share = tb.adapters / (tb.weights + tb.kv_cache)
    peers = "; ".join(f"{k}: +{100 * v:.0f}%" for k, v in sorted(costs.items(), key=lambda kv: kv[1]))
    value = (r - 1) / cheapest if cheapest > 0 else float("inf")
    out.append(
        _target(
            "adapter's extra time per token / llama.cpp's (its cheapest file)",
            value,
            "<= 1.0",
            value <= 1.0,
            f"{engine}: +{100 * (r - 1):.0f}% time (fp16 adapter = {100 * share:.0f}% of bytes); {peers}",
        )
    )


def _same_graph_targets(tok_s: dict) -> list[dict]:
    """Our runtime against ONNX Runtime GenAI running our own 4-bit graph with the same adapter: what our
    decode loop and session handling cost over GenAI's C++ loop (issue 24: within 2%)."""
    out = []
    for key in [k for k in tok_s if k.startswith("ORT GenAI on our ")]:
        label, case = key.split("|")
        quant = label.removeprefix("ORT GenAI on our ").split()[0]
        ours = f"{OURS} onnx {quant}|{case}"
        if ours in tok_s:
            r = paired_ratio(tok_s[ours], tok_s[key])
            out.append(
                _target(
                    f"ours / ORT GenAI on the same graph ({case})",
                    r,
                    ">= 0.98",
                    r is not None and r >= 0.98,
                    f"{ours} vs {key}",
                )
            )
    return out


def _stack_targets(tok_s: dict) -> list[dict]:
    """Two stacked adapters' extra time per token against one adapter's, per engine of ours (<= 1.6)."""
    out = []
    for ab in [k for k in tok_s if k.startswith(OURS) and k.endswith("|ab")]:
        engine = ab[: -len("|ab")]
        base, one = f"{engine}|base", f"{engine}|a"
        if base not in tok_s or one not in tok_s:
            continue
        r_one, r_two = paired_ratio(tok_s[base], tok_s[one]), paired_ratio(tok_s[base], tok_s[ab])
        if r_one and r_two and r_one > 1:
            v = (r_two - 1) / (r_one - 1)
            out.append(
                _target(
                    f"two stacked / one adapter, extra time per token ({engine})",
                    v,
                    "<= 1.6",
                    v <= 1.6,
                    f"one: +{100 * (r_one - 1):.0f}%, two: +{100 * (r_two - 1):.0f}% time per token",
                )
            )
    return out


def _merged_targets(tok_s: dict, memory: dict) -> list[dict]:
    """Each of our merged engines against the same engine's base (issue 24: >= 0.97), with the merge's
    quality: merged vs unmerged logits, as a share of the adapter's effect (the merged worker's)."""
    out = []
    for merged in [k for k in tok_s if k.startswith(OURS) and k.endswith("|merged")]:
        base = merged.replace(" merged|merged", "|base")
        if base in tok_s:
            r = paired_ratio(tok_s[merged], tok_s[base])
            q = memory.get(merged.split("|")[0], {}).get("merge_quality")
            how = (
                f"merged vs unmerged logits: {q['rel_to_adapter_effect']:.2f} of the adapter's effect, "
                f"max |diff| {q['max_abs_logit_diff']:.3f}, argmax agreement {q['argmax_agree']:.2f}"
                if q
                else ""
            )
            out.append(
                _target(
                    f"merged / base ({merged.split('|')[0]})", r, ">= 0.97", r is not None and r >= 0.97, how
                )
            )
    return out


def _swap_and_add_targets(info: dict) -> list[dict]:
    """Our engines' adapter swap (p99, first step after it) and adapter add, per engine."""
    out = []
    for label, x in info["extras"].items():
        if not label.startswith(OURS) or "swap_p99_ms" not in x:
            continue
        out.append(_target(f"swap p99 ms ({label})", x["swap_p99_ms"], "< 1", x["swap_p99_ms"] < 1.0))
        out.append(
            _target(
                f"first step after swap / steady ({label})",
                x["first_over_steady"],
                "<= 1.0 (noise 1.1)",
                x["first_over_steady"] <= 1.1,
            )
        )
        if "add_to_ready_ms" in x:
            mb = info["files"]["adapter"]["safetensors_mb"]
            # the target includes the first add in a fresh process (hash checked), timed by the cold worker
            first = info["cold"].get(label, {}).get("first_add_ms", float("nan"))
            again = x.get("add_bundled_to_ready_ms", float("nan"))
            worst = max(v for v in (x["add_to_ready_ms"], first, again) if not math.isnan(v))
            out.append(
                _target(
                    f"add a {mb:.0f} MB adapter, ms ({label})",
                    worst,
                    "< 20",
                    worst < 20,
                    f"first add in a fresh process (bundled, hash checked) {first:.1f}; a later file: load "
                    f"{x['add_adapter_ms']:.1f} + first request setup {x['first_request_setup_ms']:.1f}; "
                    f"one the bundle ships (hash checked): "
                    f"{x.get('add_bundled_to_ready_ms', float('nan')):.1f}",
                )
            )
    return out


def _workload_targets(info: dict) -> list[dict]:
    """The multi-adapter workload (issue 33), per engine of ours against the best peer: time per request
    >= 2x, time to first token after a switch >= 5x (benchmarks.workload_bench)."""
    workload = info.get("workload") or {}
    if "ratios" not in workload:
        return []
    from benchmarks.workload_report import targets as workload_targets

    return [
        _target(t["target"], t["value"], t["goal"], t["met"], t["detail"]) for t in workload_targets(workload)
    ]


def _cold_start_targets(results: dict, shape: str, info: dict) -> list[dict]:
    """Per cold-start row: time to the first token (0.5B shape) and peak RSS against the memory budget."""
    out = []
    for label, x in info["cold"].items():
        if "error" in x:
            out.append(_target(f"cold start ({label})", None, "< 1 s", False, x["error"][:200]))
            continue
        if shape.startswith("qwen"):
            out.append(
                _target(
                    f"cold start to first token, s ({label})",
                    x["load_to_first_token_s"],
                    "< 1",
                    x["load_to_first_token_s"] < 1.0,
                    f"process start to first token {x['process_to_first_token_s']:.2f} s "
                    f"(imports {x['import_s']:.2f} s)",
                )
            )
        parts = memory_budget_parts(info, label, results["plan"], x)
        budget = sum(parts.values())
        base_rss = baseline_mb(results, backend_of(label, x))
        r = (x["peak_rss_mb"] - base_rss) / budget
        out.append(
            _target(
                f"peak RSS / ({' + '.join(parts)}), {setting(label, x)} ({label})",
                r,
                "<= 1.3",
                r <= 1.3,
                memory_why(label, x, base_rss, parts, r <= 1.3),
            )
        )
    return out


def _is_peer(key: str) -> bool:
    """A peer's row: not our engine, and not llama.cpp running our own adapter file
    ("... lora_path edge-lora f16")."""
    return not key.startswith(OURS) and OURS not in key.split("|")[0]


def _peer_base(tok_s: dict, peer_a: str) -> str | None:
    label = peer_a.split("|")[0]
    for candidate in (label.split(" lora_path")[0], label.replace(" +LoRA baked", "")):
        if candidate != label and f"{candidate}|base" in tok_s:
            return f"{candidate}|base"
    return f"{label}|base" if f"{label}|base" in tok_s else None
