"""From raw results to numbers a person reads: medians, paired ratios, rooflines, targets, markdown.

Labels are "<engine> <quant>[ <variant>]" and cases "base" / "a" (one rank-16 adapter unmerged) /
"ab" (two stacked) / "merged". Rooflines use one byte count per (model, bit width, adapter state)
so every engine is held to the same floor: the GGUF's weights (q4_0 = 4.5 bits, q8_0 = 8.5 bits),
the adapter in fp16 (the smallest form that keeps its accuracy), and an f16 KV cache at the
request's average context.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import roofline
from benchmarks.plan import BITS
from benchmarks.pool import median, paired_ratio

OURS = "edge-lora"
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"


def _bits(label: str) -> int | None:
    for token in label.split():
        if token in BITS:
            return BITS[token]
    return None


def _config(raw: dict):
    from edge_lora.config import ModelConfig

    return ModelConfig.from_saved(raw)


def token_bytes(info: dict, plan: dict, bits: int, adapters: int, adapter_bytes_per_value: int = 2) -> roofline.TokenBytes:
    config = _config(info["config"])
    quant = {4: "q4_0", 8: "q8_0"}[bits]
    context = plan["prompt"] + plan["new_tokens"] // 2
    return roofline.TokenBytes(int(info["files"][quant]["token_weight_mb"] * 1e6),
                               roofline.adapter_bytes(config, 16, adapter_bytes_per_value, adapters),
                               roofline.kv_bytes(config, context, 2))


def _best(tok_s: dict, keys: list[str]) -> str | None:
    keys = [k for k in keys if k in tok_s and median(tok_s[k])]
    return max(keys, key=lambda k: median(tok_s[k])) if keys else None


def summarize(results: dict) -> dict:
    bw = results["bandwidth"]
    out = {"models": {}}
    for shape, info in results["models"].items():
        tok_s = info["decode"]["tok_s"]
        rows = []
        for key, values in tok_s.items():
            label, case = key.split("|")
            bits = _bits(label)
            row = {"engine": label, "case": case, "tok_s": median(values), "runs": values,
                   "prefill_ms": median(info["decode"]["prefill_ms"][key])}
            if bits and row["tok_s"]:
                tb = token_bytes(info, results["plan"], bits, {"a": 1, "ab": 2}.get(case, 0))
                ws = bw["working_set_gbs"].get(str(max(16, int(info["files"]["q4_0" if bits == 4 else "q8_0"]["token_weight_mb"]))))
                row.update(bits=bits, token_mb=tb.total / 1e6, roofline_tok_s=roofline.roofline_tok_s(bw["dram_gbs"], tb),
                           pct_roofline=100 * row["tok_s"] / roofline.roofline_tok_s(bw["dram_gbs"], tb))
                if ws:
                    row["pct_cache_roofline"] = 100 * row["tok_s"] / roofline.roofline_tok_s(ws, tb)
            rows.append(row)
        out["models"][shape] = {"rows": rows, "targets": targets(results, shape, info)}
    return out


def targets(results: dict, shape: str, info: dict) -> list[dict]:
    """Every target of the performance issue that this model's numbers can judge (4-bit)."""
    tok_s, extras, plan = info["decode"]["tok_s"], info["extras"], results["plan"]
    ours_a = _best(tok_s, [k for k in tok_s if k.startswith(OURS) and _bits(k) == 4 and k.endswith("|a")])
    ours_base = _best(tok_s, [k for k in tok_s if k.startswith(OURS) and _bits(k) == 4 and k.endswith("|base")])
    peer_a = _best(tok_s, [k for k in tok_s if not k.startswith(OURS) and _bits(k) == 4 and k.endswith("|a")])
    peer_base = _best(tok_s, [k for k in tok_s if not k.startswith(OURS) and _bits(k) == 4 and k.endswith("|base")])
    out = []

    def add(name, value, goal, met, detail=""):
        out.append({"target": name, "value": value, "goal": goal, "met": met, "detail": detail})

    if ours_a and peer_a:
        r = paired_ratio(tok_s[ours_a], tok_s[peer_a])
        add("adapter unmerged: fastest edge-lora / best peer", r, ">= 1.3", r is not None and r >= 1.3, f"{ours_a} vs {peer_a}")
    if ours_base and peer_base:
        r = paired_ratio(tok_s[ours_base], tok_s[peer_base])
        add("no adapter: fastest edge-lora / best peer", r, ">= 1.0", r is not None and r >= 1.0, f"{ours_base} vs {peer_base}")
    if ours_a:
        engine = ours_a.split("|")[0]
        base = f"{engine}|base"
        tb = token_bytes(info, plan, 4, 1)
        share = tb.adapters / (tb.weights + tb.kv_cache)
        r = paired_ratio(tok_s[base], tok_s[ours_a])  # time per token with / without
        if r:
            add("adapter cost: extra time per token / (1.5 x fp16 byte share)", (r - 1) / (1.5 * share), "<= 1.0",
                (r - 1) <= 1.5 * share, f"{engine}: +{100 * (r - 1):.0f}% time, fp16 adapter = {100 * share:.0f}% of bytes")
        for peer in [k for k in tok_s if not k.startswith(OURS) and _bits(k) == 4 and k.endswith("|a")]:
            pb = _peer_base(tok_s, peer)
            if pb:
                pr = paired_ratio(tok_s[pb], tok_s[peer])
                out[-1]["detail"] += f"; {peer.split('|')[0]}: +{100 * (pr - 1):.0f}%" if pr and out else ""
    for merged in [k for k in tok_s if k.startswith(OURS) and k.endswith("|merged")]:
        base = merged.replace(" merged|merged", "|base")
        if base in tok_s:
            r = paired_ratio(tok_s[merged], tok_s[base])
            add(f"merged / base ({merged.split('|')[0]})", r, ">= 0.95 (noise)", r is not None and r >= 0.95)
    if ours_a and shape.startswith("qwen"):
        tb = token_bytes(info, plan, 4, 1)
        roof = roofline.roofline_tok_s(results["bandwidth"]["dram_gbs"], tb)
        r = median(tok_s[ours_a]) / roof
        add("0.5B 4-bit with adapter: share of the DRAM roofline", r, ">= 0.70", r >= 0.7, f"{ours_a}, roofline {roof:.1f} tok/s")
    for label, x in extras.items():
        if not label.startswith(OURS) or "swap_p99_ms" not in x:
            continue
        add(f"swap p99 ms ({label})", x["swap_p99_ms"], "< 1", x["swap_p99_ms"] < 1.0)
        add(f"first step after swap / steady ({label})", x["first_over_steady"], "<= 1.0 (noise 1.1)", x["first_over_steady"] <= 1.1)
        if "add_to_ready_ms" in x:
            mb = info["files"]["adapter"]["safetensors_mb"]
            add(f"add a {mb:.0f} MB adapter, ms ({label})", x["add_to_ready_ms"], "< 20", x["add_to_ready_ms"] < 20,
                f"load {x['add_adapter_ms']:.1f} + first request setup {x['first_request_setup_ms']:.1f}")
    for label, x in info["cold"].items():
        if "error" in x:
            add(f"cold start ({label})", None, "< 1 s", False, x["error"][:200])
            continue
        if shape.startswith("qwen"):
            add(f"cold start to first token, s ({label})", x["load_to_first_token_s"], "< 1", x["load_to_first_token_s"] < 1.0,
                f"process start to first token {x['process_to_first_token_s']:.2f} s (imports {x['import_s']:.2f} s)")
        budget = _memory_budget_mb(info, label, plan)
        base_rss = results.get("baseline_rss", {}).get("rss_mb", 0.0)
        r = (x["peak_rss_mb"] - base_rss) / budget
        add(f"peak RSS / (file + adapter + KV) ({label})", r, "<= 1.3", r <= 1.3,
            f"peak {x['peak_rss_mb']:.0f} MB - {base_rss:.0f} MB interpreter+libraries, budget {budget:.0f} MB")
    return out


def _peer_base(tok_s: dict, peer_a: str) -> str | None:
    label = peer_a.split("|")[0]
    for candidate in (label.replace(" lora_path", ""), label.replace(" +LoRA baked", "")):
        if candidate != label and f"{candidate}|base" in tok_s:
            return f"{candidate}|base"
    return f"{label}|base" if f"{label}|base" in tok_s else None


def _memory_budget_mb(info: dict, label: str, plan: dict) -> float:
    config = _config(info["config"])
    quant = label.split()[-1]
    files = info["files"]
    if "llama.cpp" in label:  # the context's KV cache is allocated whole: n_ctx tokens in f16
        kv = roofline.kv_bytes(config, min(config.max_position_embeddings, 4096), 2)
        adapter = files["adapter"]["gguf_mb"]
    else:  # ONNX Runtime grows an fp32 KV cache with the request
        kv = roofline.kv_bytes(config, plan["prompt"] + plan["new_tokens"], 4)
        adapter = files["adapter"]["safetensors_mb"]
    return files[quant]["file_mb"] + adapter + kv / 1e6


# --- markdown -------------------------------------------------------------------------


def _fmt(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def summary_markdown(results: dict, pngs: list[Path] | None = None, rel_to: Path | None = None) -> str:
    s, bw, plan = results["summary"], results["bandwidth"], results["plan"]
    m = results["machine"]
    lines = [f"Run {results['date']} ({'quick' if results['quick'] else 'full'}, {results['wall_s'] / 60:.0f} min) on {m['cpu']}, "
             f"{m['cores']} cores{' (AMX: llama.cpp extra buffer types off)' if m.get('amx') else ''}; load average "
             f"{results['load_average_start']} at start, {results['load_average_end']} at the end (other jobs share this machine). "
             f"{plan['threads']} threads, prompt {plan['prompt']} tokens, {plan['new_tokens']} decoded, {plan['rounds']} interleaved rounds: "
             f"medians, ratios paired per round. Memory bandwidth: {bw['dram_gbs']:.1f} GB/s from DRAM ({bw['dram_buffer_mb']} MB buffer), "
             + ", ".join(f"{g:.1f} GB/s over {mb} MB" for mb, g in bw["working_set_gbs"].items())
             + f" (LLC {bw['llc_mb']:.0f} MB: the models fit in it, so engines can pass the DRAM roofline).", ""]
    for shape, info in s["models"].items():
        lines += [f"### {shape}: targets", "", "| target | measured | goal | met | how |", "|---|---|---|---|---|"]
        for t in info["targets"]:
            lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {'yes' if t['met'] else '**no**'} | {t['detail']} |")
        lines += ["", f"### {shape}: decode", "",
                  "| engine | case | tok/s (median) | % DRAM roofline | % cache roofline | prefill ms |", "|---|---|---|---|---|---|"]
        for r in sorted(info["rows"], key=lambda r: (r.get("bits") or 99, r["case"], -(r["tok_s"] or 0))):
            lines.append(f"| {r['engine']} | {r['case']} | {_fmt(r['tok_s'], 1)} | {_fmt(r.get('pct_roofline'), 0)} | "
                         f"{_fmt(r.get('pct_cache_roofline'), 0)} | {_fmt(r['prefill_ms'], 0)} |")
        lines.append("")
    if results.get("train"):
        lines += ["### training (SmolLM2-135M shape, rank 16 all-linear)", "", "| case | tokens/s | peak RSS MB |", "|---|---|---|"]
        for name, c in results["train"]["cases"].items():
            lines.append(f"| {name} | {c['tokens_per_s']:.0f} | {c['peak_rss_mb']:.0f} |")
        lines.append("")
    for p in pngs or []:
        rel = p.relative_to(rel_to) if rel_to and p.is_relative_to(rel_to) else p
        lines.append(f"![{p.stem}]({rel.as_posix()})")
    return "\n".join(lines)


def update_readme(path: Path, results: dict, pngs: list[Path]) -> None:
    """Replace the Summary section between the markers (the other sections stay as their owners wrote them)."""
    from edge_lora.atomic import atomic_write_text

    body = summary_markdown(results, pngs, path.parent)
    block = f"{BEGIN}\n## Summary\n\n{body}\n{END}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        head, _, rest = text.partition("\n")
        text = f"{head}\n\n{block}\n{rest}"
    atomic_write_text(path, text)
