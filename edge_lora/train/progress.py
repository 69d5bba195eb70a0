"""The progress line (loss, tokens/s, ETA) and the metrics log (one JSON object per line, appended)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, start: int, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.tokens = 0

    def update(self, step: int, loss: float, tokens: int, lr: float) -> dict:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done else 0.0
        if self.enabled:
            width = 24
            filled = int(width * step / max(1, self.total))
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} | loss {loss:.4f} | "
                f"{tps:,.0f} tok/s | lr {lr:.2e} | ETA {_clock(eta)}"
            )
            self.stream.write(("\r" + line) if self.tty else line + "\n")
            self.stream.flush()
        return {"tokens_per_s": round(tps, 2), "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 1)}

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends one JSON line per record; a resumed run continues the same file."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
