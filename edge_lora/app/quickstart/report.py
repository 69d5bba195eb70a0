"""The quickstart's summary: one accuracy row per (backend, quantization), then the timings."""

from __future__ import annotations

import json

from edge_lora.app.quickstart.combined import combined_lines


def _pct(value: float | None) -> str:
    return "   -" if value is None else f"{value:5.1f}"


def format_table(summary: dict) -> str:
    out = [f"exact-match accuracy (%) on {summary['eval_items']} held-out prompts per task"]
    out += _accuracy_rows(summary)
    for name, stack in summary.get("stacks", {}).items():
        what = (
            "composes: the first task's answers, scored with the style applied"
            if stack["composes"]
            else "conflicts: both rewrite every letter; each task scored as it is"
        )
        out.append(f"  stack {name} ({' + '.join(stack['adapters'])}) {what}")
    out += combined_lines(summary)
    tok = summary.get("tokenizer")
    if tok:
        out.append("")
        out.append(
            f"tokenizer: {tok['style']}; the runtime (both backends) and llama.cpp's own tokenizer on the "
            f"GGUF give the same ids on {tok['equal']}/{tok['texts']} texts"
            + (f", differ on {tok['differing']}" if tok["differing"] else "")
        )
    out += ["", *_timing_lines(summary)]
    checks = summary["checks"]
    out.append("")
    out.append("targets: " + ("all met" if all(c["ok"] for c in checks) else "NOT all met"))
    out += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['what']}" for c in checks]
    out.append(f"total {summary['total_s']:.1f}s; bundle at {summary['bundle']}")
    return "\n".join(out)


def _accuracy_rows(summary: dict) -> list[str]:
    """The accuracy table: a header, a rule, the fp32 host row, then one row per exported base."""
    tasks, styles = summary["tasks"], summary.get("styles", [])
    adapters = [*tasks, *styles]
    stacks = list(summary.get("stacks", {}))
    head = (
        ["backend", "quant"]
        + [f"base {t}" for t in adapters]
        + [f"+{t}" for t in adapters]
        + [f"stack {name}" for name in stacks]
        + [f"merged {tasks[0]}"]
    )
    host = summary["host"]
    rows = [
        ["pytorch", "fp32"]
        + [_pct(host["base"][t]) for t in adapters]
        + [_pct(host["adapter"][t]) for t in adapters]
        + ["-"] * len(stacks)
        + ["-"]
    ]
    for r in summary["runs"]:
        stacked = r.get("stacked") or {}
        rows.append(
            [r["backend"], r["quant"]]
            + [_pct(r["base"][t]) for t in adapters]
            + [_pct(r["adapter"][t]) for t in adapters]
            + [
                "/".join(_pct(v).strip() for v in stacked[name].values()) if name in stacked else "-"
                for name in stacks
            ]
            + [_pct(r.get("merged")) if r.get("merged") is not None else "-"]
        )
    widths = [max(len(str(row[i])) for row in [head] + rows) for i in range(len(head))]

    def line(cells: list) -> str:
        return "  ".join(
            str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _timing_lines(summary: dict) -> list[str]:
    t = summary["timings"]
    lines = [
        "timings: "
        + ", ".join(f"train {k} {v:.1f}s" for k, v in t["train_s"].items())
        + f", export {t['export_s']:.1f}s"
    ]
    for r in summary["runs"]:
        lines.append(
            f"  {r['backend']:8s} {r['quant']:5s} load {r['load_s'] * 1000:6.0f} ms  "
            f"add adapters {r['add_adapters_s'] * 1000:5.0f} ms  swap {r['swap_ms']:6.2f} ms  "
            f"decode {r['tokens_per_s']:7.1f} tok/s  on {r.get('device', 'CPU')}"
        )
    return lines


def format_json(summary: dict) -> str:
    return json.dumps(summary, indent=2)
