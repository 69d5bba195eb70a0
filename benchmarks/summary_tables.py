"""The Summary's per-section markdown tables, each from one model's (or the training run's) raw results.

``dtype_markdown``: decode by adapter dtype on llama.cpp; ``memory_markdown``: resident MB per step of
a cold start; ``loaded_markdown``: the adapters-loaded sweep; ``train_markdown``: the training cases
and their targets against PEFT. Each returns its lines (a trailing blank one included), or none when the
run has no such numbers. benchmarks.report puts them together.
"""

from __future__ import annotations

from benchmarks.memory_budget import backend_of, baseline_mb
from benchmarks.pool import median, paired_ratio


def fmt(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def memory_markdown(shape: str, model: dict, results: dict) -> list[str]:
    """What an app needs: resident MB above the interpreter, per engine setting, per step of a cold
    start."""
    cold = {k: x for k, x in model.get("cold", {}).items() if "rss_after_load_mb" in x}
    if not cold:
        return []
    bases = ", ".join(f"{b} {baseline_mb(results, b):.0f} MB" for b in ("onnx", "llamacpp"))
    lines = [
        f"### {shape}: memory (MB resident above the interpreter and the backend's libraries: {bases})",
        "",
        "| engine | loaded | + first token | + adapter added | peak (its request) | load s | first token s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, x in cold.items():
        base_rss = baseline_mb(results, backend_of(label, x))
        steps = ("rss_after_load_mb", "rss_after_first_token_mb", "rss_after_adapter_mb", "peak_rss_mb")
        mb = [x[k] - base_rss for k in steps]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.0f}" for v in mb)
            + f" | {x['load_s']:.2f} | {x['load_to_first_token_s']:.2f} |"
        )
    return lines + [""]


def loaded_markdown(shape: str, model: dict) -> list[str]:
    """The adapters-loaded sweep: resident memory and decode speed (one adapter active) by adapters
    loaded."""
    sweeps = {label: sw for label, sw in (model.get("scaling") or {}).items() if sw.get("loaded")}
    if not sweeps:
        return []
    size = model["files"]["adapter"]["safetensors_mb"]
    lines = [
        f"### {shape}: adapters loaded (rank 16, all-linear, {size:.0f} MB each as safetensors)",
        "",
        "| engine | loaded | RSS MB | MB per adapter (from the base) | tok/s, one active |",
        "|---|---|---|---|---|",
    ]
    for label, sw in sweeps.items():
        base = (sw.get("base_rss") or {}).get("rss_mb")
        for row in sw["loaded"]:
            per = (row["rss_mb"] - base) / row["loaded"] if base else None
            lines.append(
                f"| {label} | {row['loaded']} | {row['rss_mb']:.0f} | {fmt(per, 1)} | "
                f"{fmt(row['tok_s'], 1)} |"
            )
    return lines + [""]


def dtype_markdown(shape: str, model: dict) -> list[str]:
    """Decode by adapter dtype on llama.cpp: adapter "a" as our --adapter-dtype and as llama.cpp's own
    convert_lora_to_gguf.py write it, each against the same run's base (paired rounds), and the file's
    size."""
    tok_s, files = model["decode"]["tok_s"], model.get("lora_files") or {}
    rows = []
    for key in tok_s:
        label, case = key.split("|")
        if case != "a" or not label.startswith("llama.cpp") or " lora_path" not in label:
            continue
        quant, source = label.split()[1], label.split(" lora_path")[1].strip() or "edge-lora f32"
        base = f"llama.cpp {quant}|base"
        r = paired_ratio(tok_s[key], tok_s[base]) if base in tok_s else None
        mb = files.get(source, {}).get("mb")
        rows.append(f"| {quant} | {source} | {fmt(mb, 1)} | {fmt(median(tok_s[key]), 1)} | {fmt(r, 2)} |")
    if not rows:
        return []
    return [
        f"### {shape}: adapter dtype (rank 16, all-linear) on llama.cpp",
        "",
        "| base | adapter file | MB | tok/s | vs base (paired) |",
        "|---|---|---|---|---|",
        *sorted(rows),
        "",
    ]


def train_markdown(train: dict) -> list[str]:
    """The training cases (tokens/s, peak RSS), their targets against PEFT and the 0.5B-shape row."""
    lines = [
        "### training (SmolLM2-135M shape, rank 16 all-linear)",
        "",
        "| case | compute | tokens/s | peak RSS MB |",
        "|---|---|---|---|",
    ]
    for name, c in train["cases"].items():
        lines.append(
            f"| {name} | {c.get('compute_dtype', 'float32')} | {c['tokens_per_s']:.0f} | "
            f"{fmt(c.get('peak_rss_mb'), 0)} |"
        )
    targets = train.get("targets")
    if isinstance(targets, list):  # earlier runs kept only the goals
        lines += [
            "",
            "| target vs PEFT (same run) | speed | peak RSS | goal | met |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['case']} ({t['compute_dtype']}) | {t['speed_vs_peft']:.2f}x | {t['rss_vs_peft']:.2f}x | "
            f"{t['goal']} | {'yes' if t['met'] else '**no**'} |"
            for t in targets
        ]
    choices = train.get("dtype_choice") or []
    if choices:
        lines += [
            "",
            "| --compute-dtype auto vs the faster of fp32/bf16 | picked | auto | fp32 | bf16 tok/s "
            "| ratio | goal | met |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['shape']} | {c['auto_dtype']} | {c['auto_tok_s']:.0f} | {c['fp32_tok_s']:.0f} | "
            f"{c['bf16_tok_s']:.0f} | {c['auto_vs_faster']:.2f} | >= 0.95 | "
            f"{'yes' if c['met'] else '**no**'} |"
            for c in choices
        ]
    real = train.get("real_size")
    if real:
        lines.append(
            f"| edge-lora int4, Qwen2.5-0.5B shape | {real['tokens_per_s']:.0f} | "
            f"{fmt(real.get('peak_rss_mb'), 0)} |"
        )
        lines += [
            "",
            f"At the 0.5B shape, 1,000 examples of 256 tokens take "
            f"{real['seconds_per_1000_examples'] / 60:.0f} minutes.",
        ]
    return lines + ([f"Note: {train['note']}."] if train.get("note") else []) + [""]


def quality_markdown(quality: dict) -> list[str]:
    """The real-model quality rows (benchmarks.quality_bench): perplexity against full precision, bits per
    weight, size, decode speed against our default of the same format; then the quality targets."""
    from benchmarks.quality_exports import BASELINE_REV
    from benchmarks.quality_targets import table, targets

    if "rows" not in quality:
        return ["### quality (real weights)", "", f"Not measured: {quality.get('error', '')[-300:]}", ""]
    rows = table(quality)
    kind = "quick" if quality.get("quick") else "full"
    lines = [
        f"### {quality['model']}: quality (real weights, {kind})",
        "",
        f"Measured {quality.get('date', 'with the run')}"
        + (
            f", load average {quality['load_average_start']} at its start, {quality['load_average_end']} "
            "at its end (other jobs share this machine). "
            if "load_average_end" in quality
            else ". "
        )
        + f"Perplexity on {quality['tokens']:,} tokens of `{quality['text']}` ({quality['windows']} "
        f"windows of {quality['window']}, the same ids for every engine); bits per weight = file bytes x 8 / "
        f"{quality['params']:,} parameters; decode: greedy, {quality['plan']['prompt']}-token prompt, "
        f"{quality['plan']['new_tokens']} tokens, median of {quality['plan']['rounds']} interleaved rounds "
        "(ours through our runtime, the peers' through their own), speed against our default of the same "
        f"format (ONNX int4, GGUF q4_0). Section time {quality['wall_s'] / 60:.1f} min (exports "
        f"{quality['build_s']:.0f} s, perplexity {quality['ppl_s']:.0f} s, "
        f"decode {quality['decode_s']:.0f} s).",
        "",
        "| export | by | perplexity | / full precision | bits per weight | MB | tok/s | speed / default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["format"] != "hf", r["format"], -(r["bits_per_weight"] or 0))):
        by = {"edge-lora": "ours", "edge-lora today": f"ours at {BASELINE_REV}"}.get(r["source"], r["source"])
        ppl = fmt(r["ppl"]) if r["ppl"] else f"error: {(r['error'] or '')[:80]}"
        lines.append(
            f"| {r['label']} | {by} | {ppl} | {fmt(r['ppl_ratio'], 3)} | {fmt(r['bits_per_weight'])} | "
            f"{r['file_mb']:.1f} | {fmt(r['tok_s'], 1)} | {fmt(r['speed_ratio'])} |"
        )
    for name, err in (quality.get("build_errors") or {}).items():
        lines.append(f"| {name} | (not built) | {err.splitlines()[-1][:120] if err else ''} | | | | | |")
    lines += ["", "| quality target | measured | goal | met | how |", "|---|---|---|---|---|"]
    for t in targets(quality):
        met = "yes" if t["met"] else "**no**"
        lines.append(f"| {t['target']} | {fmt(t['value'], 3)} | {t['goal']} | {met} | {t['detail']} |")
    return lines + [""]
