"""PNG charts of a run (matplotlib, Agg): decode speed, swap latency, training, scaling, quality."""

from __future__ import annotations

from pathlib import Path

CASE_COLORS = {"base": "#4c72b0", "a": "#dd8452", "ab": "#c44e52", "merged": "#55a868"}
CASE_NAMES = {"base": "no adapter", "a": "1 adapter (unmerged)", "ab": "2 stacked", "merged": "merged"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def draw_all(results: dict, out: Path) -> list[Path]:
    pngs = []
    if results.get("models"):
        pngs += [decode_chart(results, out / "decode.png"), swap_chart(results, out / "swap.png")]
    if results.get("train"):
        pngs.append(train_chart(results["train"], out / "train.png"))
    if any(m.get("scaling") for m in results.get("models", {}).values()):
        pngs.append(scaling_chart(results, out / "scaling.png"))
    if "rows" in results.get("quality", {}):
        pngs.append(quality_chart(results["quality"], out / "quality.png"))
    return [p for p in pngs if p]


def decode_chart(results: dict, path: Path) -> Path:
    plt = _plt()
    models = results["summary"]["models"]
    heights = [len({r["engine"] for r in m["rows"]}) for m in models.values()]
    fig, axes = plt.subplots(
        len(models),
        1,
        figsize=(9, 1.2 + 0.42 * sum(heights) + 0.9 * len(models)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, (shape, m) in zip(axes[:, 0], models.items()):
        engines = sorted(
            {r["engine"] for r in m["rows"]},
            key=lambda e: (0 if e.startswith("edge-lora") else 1, e),
            reverse=True,
        )
        cases = ["base", "merged", "a", "ab"]
        width = 0.84 / max(sum(1 for r in m["rows"] if r["engine"] == e) for e in engines)
        for i, engine in enumerate(engines):
            rows = sorted(
                [r for r in m["rows"] if r["engine"] == engine and r["tok_s"]],
                key=lambda r: cases.index(r["case"]),
            )
            for j, r in enumerate(rows):
                y = i + (j - (len(rows) - 1) / 2) * width
                ax.barh(y, r["tok_s"], height=width * 0.9, color=CASE_COLORS[r["case"]])
                pct = f"  {r['tok_s']:.0f}" + (
                    f" ({r['pct_roofline']:.0f}% of roofline)" if r.get("pct_roofline") else ""
                )
                ax.text(r["tok_s"], y, pct, va="center", fontsize=7)
        ax.set_yticks(range(len(engines)))
        ax.set_yticklabels([("▶ " if e.startswith("edge-lora") else "") + e for e in engines])
        roofs = _roofline_marks(ax, m["rows"])
        ax.set_title(
            f"{shape}: decode tokens/s (median of {results['plan']['rounds']} rounds, higher is better)",
            loc="left",
        )
        ax.set_xlim(0, max([r["tok_s"] or 0 for r in m["rows"]] + [roof for _, roof in roofs]) * 1.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CASE_COLORS.values()]
    fig.legend(handles, list(CASE_NAMES.values()), loc="lower center", ncol=4, frameon=False)
    return _save(plt, fig, path, rect=(0, 0.04, 1, 1))  # room for the legend below


def _roofline_marks(ax, rows: list[dict]) -> list[tuple[int, int]]:
    """A dotted line per bit width at the DRAM roofline with one adapter; returns (bits, tok/s) of each."""
    roofs = sorted(
        {
            (r["bits"], round(r["roofline_tok_s"]))
            for r in rows
            if r.get("roofline_tok_s") and r["case"] == "a"
        }
    )
    for k, (bits, roof) in enumerate(roofs):
        ax.axvline(roof, color="gray", ls=":", lw=1)
        ax.text(
            roof,
            -0.55 - 0.45 * k,
            f"DRAM roofline {bits}-bit + adapter: {roof} tok/s ",
            fontsize=7,
            color="gray",
            ha="right",
            va="center",
        )
    return roofs


def swap_chart(results: dict, path: Path) -> Path | None:
    plt = _plt()
    rows = [
        (shape, label, x)
        for shape, info in results["models"].items()
        for label, x in info["extras"].items()
        if "first_over_steady" in x
    ]
    if not rows:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 1 + 0.45 * len(rows)))
    names = [f"{label} ({shape.split('-')[0]})" for shape, label, _ in rows]
    ys = range(len(rows))
    p50 = [x.get("swap_p50_ms", 0) * 1e3 for _, _, x in rows]
    p99 = [x.get("swap_p99_ms", 0) * 1e3 for _, _, x in rows]
    left.barh([y + 0.2 for y in ys], p99, height=0.4, color="#c44e52", label="p99")
    left.barh([y - 0.2 for y in ys], p50, height=0.4, color="#4c72b0", label="p50")
    left.axvline(1000, color="gray", ls=":")
    left.text(1000, len(rows) - 0.5, " target 1 ms", color="gray", fontsize=7)
    left.set_xscale("symlog", linthresh=1)
    left.set_yticks(list(ys))
    left.set_yticklabels(names)
    left.set_xlabel("swap between requests, µs (lower is better)")
    left.legend(frameon=False, fontsize=7)
    ratio = [x["first_over_steady"] for _, _, x in rows]
    right.barh(list(ys), ratio, color=["#55a868" if r <= 1.1 else "#c44e52" for r in ratio])
    right.axvline(1.0, color="gray", ls=":")
    for y, (r, (_, _, x)) in enumerate(zip(ratio, rows)):
        right.text(
            r,
            y,
            f"  {r:.2f} ({x['first_step_after_swap_ms']:.1f} / {x['steady_step_ms']:.1f} ms)",
            va="center",
            fontsize=7,
        )
    right.set_yticks([])
    right.set_xlim(0, max(ratio) * 1.6)
    right.set_xlabel("first step after a swap / steady step (1.0 = no penalty)")
    return _save(plt, fig, path)


def train_chart(train: dict, path: Path) -> Path:
    plt = _plt()
    cases = train["cases"]
    names = list(cases)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 1 + 0.45 * len(names)))
    colors = ["#8172b3" if n == "peft" else "#dd8452" for n in names]
    for ax, key, label in (
        (left, "tokens_per_s", "training tokens/s (higher is better)"),
        (right, "peak_rss_mb", "peak RSS MB (lower is better)"),
    ):
        values = [cases[n].get(key) for n in names]  # None: not measured cleanly in that run
        ax.barh(range(len(names)), [v or 0 for v in values], color=colors)
        for y, v in enumerate(values):
            ax.text(v or 0, y, f"  {v:.0f}" if v is not None else "  n/a", va="center", fontsize=7)
        ax.set_xlim(0, max(v or 0 for v in values) * 1.25)
        ax.set_xlabel(label)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is left else [])
    fig.suptitle(
        f"LoRA training, SmolLM2-135M shape, rank {train.get('rank')}, "
        f"batch {train.get('batch')} x {train.get('seq')}",
        x=0.01,
        ha="left",
    )
    return _save(plt, fig, path)


def scaling_chart(results: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    (rank_ax, loaded_ax), (stacked_ax, ctx_ax) = axes
    for info in results["models"].values():
        for label, sw in (info.get("scaling") or {}).items():
            if "error" not in sw:
                _plot_sweeps(axes, label.replace("edge-lora ", ""), sw)
    for ax, title, xlabel in (
        (rank_ax, "decode vs adapter rank (dotted: no adapter)", "rank"),
        (loaded_ax, "decode (1 active) and memory vs adapters loaded", "adapters loaded"),
        (stacked_ax, "decode vs adapters stacked in one request", "adapters stacked"),
        (ctx_ax, "decode vs context length", "context tokens"),
    ):
        ax.set_title(title, loc="left", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False, fontsize=7)
    from matplotlib.ticker import ScalarFormatter

    for ax in (rank_ax, loaded_ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    fig.suptitle(
        f"scaling, {next(iter(results['models']))} shape, 4-bit (edge-lora engines)", x=0.01, ha="left"
    )
    return _save(plt, fig, path)


def _plot_sweeps(axes, name: str, sw: dict) -> None:
    """One engine's sweeps: decode by rank, by adapters loaded (and RSS, dashed, on a twin axis), by
    adapters stacked, by context length (with and without the adapter)."""
    (rank_ax, loaded_ax), (stacked_ax, ctx_ax) = axes
    rank_ax.plot([r["rank"] for r in sw["rank"]], [r["tok_s"] for r in sw["rank"]], "o-", label=name)
    loaded_ax.plot(
        [r["loaded"] for r in sw["loaded"]],
        [r["tok_s"] for r in sw["loaded"]],
        "o-",
        label=f"{name} tok/s",
    )
    twin = getattr(loaded_ax, "_twin", None) or loaded_ax.twinx()
    loaded_ax._twin = twin
    twin.plot(
        [r["loaded"] for r in sw["loaded"]],
        [r["rss_mb"] for r in sw["loaded"]],
        "s--",
        alpha=0.6,
        label=f"{name} RSS",
    )
    twin.set_ylabel("RSS MB (dashed)")
    stacked_ax.plot(
        [r["stacked"] for r in sw["stacked"]], [r["tok_s"] for r in sw["stacked"]], "o-", label=name
    )
    ctx_ax.plot(
        [r["context"] for r in sw["context"]],
        [r["adapter_tok_s"] for r in sw["context"]],
        "o-",
        label=f"{name} +adapter",
    )
    ctx_ax.plot(
        [r["context"] for r in sw["context"]],
        [r["base_tok_s"] for r in sw["context"]],
        "o:",
        label=f"{name} base",
    )
    for ax in (rank_ax, stacked_ax):
        ax.axhline(sw["base_tok_s"], color="gray", ls=":", lw=0.8)


QUALITY_STYLE = {  # source -> (marker, color); ours filled, the peers hollow
    "edge-lora": ("o", "#dd8452"),
    "edge-lora today": ("o", "#937860"),
    "llama.cpp quantize": ("s", "#4c72b0"),
    "ORT GenAI builder": ("D", "#8172b3"),
}


def quality_chart(quality: dict, path: Path) -> Path | None:
    """Perplexity / full precision against bits per weight, every export labelled (ours filled, the
    peers hollow; ONNX and GGUF in one plot, named in the labels)."""
    from benchmarks.quality_targets import table

    rows = [r for r in table(quality) if r["ppl_ratio"] and r["bits_per_weight"] and r["format"] != "hf"]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        marker, color = QUALITY_STYLE.get(r["source"], ("x", "gray"))
        ours = r["source"] == "edge-lora"
        ax.scatter(
            r["bits_per_weight"],
            r["ppl_ratio"],
            marker=marker,
            s=36,
            facecolors=color if ours else "none",
            edgecolors=color,
        )
        name = r["label"].replace("edge-lora ", "ours ").replace("llama.cpp quantize", "llama.cpp")
        ax.annotate(
            name,
            (r["bits_per_weight"], r["ppl_ratio"]),
            fontsize=6,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.axhline(1.10, color="#c44e52", ls=":", lw=1)
    ax.text(ax.get_xlim()[1], 1.10, "target 1.10 ", color="#c44e52", fontsize=7, ha="right", va="bottom")
    ax.axhline(1.0, color="gray", ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    bits = [r["bits_per_weight"] for r in rows]
    ax.set_xticks([t for t in (4, 5, 6, 7, 8, 10, 12, 16, 24, 32) if min(bits) * 0.9 <= t <= max(bits) * 1.1])
    ax.set_xticks([], minor=True)
    ax.get_xaxis().set_major_formatter("{x:g}")
    ax.set_xlabel("bits per weight (file bytes x 8 / parameters)")
    ax.set_ylabel("perplexity / full precision (lower is better)")
    ax.set_title(
        f"{quality['model']}: quality against size ({quality['tokens']:,} tokens of real text)", loc="left"
    )
    from benchmarks.quality_exports import BASELINE_REV

    names = {"edge-lora": "ours", "edge-lora today": f"ours, today's exporter ({BASELINE_REV})"}
    handles = [
        plt.Line2D(
            [],
            [],
            marker=m,
            ls="",
            markerfacecolor=c if s == "edge-lora" else "none",
            markeredgecolor=c,
            label=names.get(s, s),
        )
        for s, (m, c) in QUALITY_STYLE.items()
    ]
    ax.legend(handles=handles, frameon=False, fontsize=7, loc="best")
    return _save(plt, fig, path)


def _save(plt, fig, path: Path, rect=None) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
