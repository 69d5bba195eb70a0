"""The real-model quickstart's summary: accuracy before and after the adapter per backend, a few greedy
answers, a chat answer, the timings per stage, and the checks (the adapter beats the base on every
backend; the chat answer is sane)."""

from __future__ import annotations

import json

PASSAGE_CHARS = 48  # of each example passage shown
ANSWER_CHARS = 16


def real_checks(summary: dict) -> list[dict]:
    checks = []
    for run in summary["runs"]:
        acc = run["accuracy"]
        checks.append(
            {
                "what": f"{run['backend']} {run['quant']}: the adapter ({100 * acc['adapter']:.1f}%) beats "
                f"the base ({100 * acc['base']:.1f}%) on held-out passages",
                "ok": acc["adapter"] > acc["base"],
            }
        )
        chat = run["chat"]
        checks.append(
            {
                "what": f"{run['backend']} {run['quant']}: the base's chat answer names Paris",
                "ok": "paris" in chat["base"].lower(),
            }
        )
    return checks


def format_real_table(summary: dict) -> str:
    model, task, adapter = summary["model"], summary["task"], summary["adapter"]
    calibration = summary.get("calibration") or {}
    chance = 100 / len(task["labels"])
    out = [
        f"{model['title']} ({model['source']})",
        f"task: which licence is this passage from? {' / '.join(task['labels'])} ({task['source']}); "
        f"{task['train']} training passages, {task['held_out']} held out; chance {chance:.0f}%",
        f"adapter {adapter['name']!r}: rank {adapter['rank']} {adapter['targets']}, {adapter['steps']} "
        f"steps of {adapter['batch_size']} at lr {adapter['lr']:g}, trained against the "
        f"{adapter['base_quant']} base the export wrote (4-bit scales calibrated on "
        f"{calibration.get('tokens', 0)} tokens of {calibration.get('source', 'no text')}); "
        f"final loss {adapter['final_loss']:.3f}",
        "",
        f"held-out accuracy on {task['scored']} passages (the label whose first token scores highest):",
        *_accuracy_rows(summary["runs"], adapter["name"]),
        "",
        'greedy answers to "<passage>" + "\\nLicence:", base -> with the adapter:',
        *_example_rows(summary["runs"]),
        "",
        "chat through the model's own template, greedy:",
        *_chat_rows(summary["runs"], adapter["name"]),
        "",
        _timing_line(summary),
    ]
    checks = summary["checks"]
    out.append("checks: " + ("all met" if all(c["ok"] for c in checks) else "NOT all met"))
    out += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['what']}" for c in checks]
    out.append(f"work folder: {summary['work_dir']}")
    return "\n".join(out)


def _accuracy_rows(runs: list[dict], name: str) -> list[str]:
    rows = [["backend", "quant", "device", "base", f"+{name}"]]
    for run in runs:
        acc = run["accuracy"]
        scores = [f"{100 * acc[k]:.1f}%" for k in ("base", "adapter")]
        rows.append([run["backend"], run["quant"], run["device"], *scores])
    return _columns(rows, right_from=3)


def _example_rows(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    rows = [["truth", "passage", *(f"{r['backend']} {r['quant']}" for r in runs)]]
    for i, example in enumerate(runs[0]["examples"]):
        passage = example["prompt"].split("\n", 1)[0]
        cells = [f"{_short(r['examples'][i]['base'])} -> {_short(r['examples'][i]['adapter'])}" for r in runs]
        rows.append([example["truth"], _clip(passage, PASSAGE_CHARS), *cells])
    return _columns(rows)


def _chat_rows(runs: list[dict], name: str) -> list[str]:
    if not runs:
        return []
    lines = [f"  > {runs[0]['chat']['question']}"]
    for run in runs:
        where = f"{run['backend']} {run['quant']}"
        lines.append(f"  {where} base: {_one_line(run['chat']['base'])}")
        lines.append(f"  {' ' * len(where)} +{name}: {_one_line(run['chat']['adapter'])}")
    return lines


def _timing_line(summary: dict) -> str:
    stages = summary["timings"]
    parts = [f"{name} {t['wall_s']:.1f} (CPU {t['cpu_s']:.0f})" for name, t in stages.items()]
    cpu = sum(t["cpu_s"] for t in stages.values())
    threads = summary.get("threads") or {}
    return (
        f"timings, wall s (CPU s of this process): {', '.join(parts)}; total {summary['total_s']:.1f} s "
        f"(CPU {cpu:.0f}; {threads.get('threads', '?')} thread(s): "
        f"{threads.get('why', '')})"
    )


def _short(answer: str) -> str:
    return repr(_clip(answer, ANSWER_CHARS)) if answer else "''"


def _clip(text: str, limit: int) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _columns(rows: list[list[str]], right_from: int | None = None) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def cell(i: int, text: str) -> str:
        right = right_from is not None and i >= right_from
        return text.rjust(widths[i]) if right else text.ljust(widths[i])

    return ["  " + "  ".join(cell(i, c) for i, c in enumerate(r)).rstrip() for r in rows]


def format_real_json(summary: dict) -> str:
    return json.dumps(summary, indent=2)
