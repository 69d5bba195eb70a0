"""Worker processes (benchmarks.worker) and the interleaved rounds the runner drives them in."""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDERR_LINES = 200  # the tail of a worker's stderr kept for the message when it dies
STDERR_LINE_CHARS = 2000  # a longer line is kept cut to this
STDERR_MESSAGE_CHARS = 300  # the end of it that a dead worker's error message carries


def _env(threads: int) -> dict:
    return dict(
        os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false"
    )


def run_once(spec: dict, timeout: float = 300) -> dict:
    """A one-shot worker (cold start, baseline memory): its single JSON line."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
        cwd=ROOT,
        env=_env(spec.get("threads", 2)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-600:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class Worker:
    """One engine in its own process; ``ask`` sends a command and waits for the answer.

    Its stderr is read all the time by a thread of ours into a bounded tail (the last ``STDERR_LINES``
    lines): a worker that logs more than a pipe holds (64 KB; llama.cpp's LoRA loader logs a line per
    tensor) would otherwise block on its next write while we wait for its answer."""

    label: str  # e.g. "edge-lora onnx int4"
    spec: dict
    cases: list[str]
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    dead: bool = False
    argv: list[str] | None = None  # the command; None: python -m benchmarks.worker SPEC
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=STDERR_LINES))
    _reader: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv or [sys.executable, "-m", "benchmarks.worker", json.dumps(self.spec)],
            cwd=ROOT,
            env=_env(self.spec.get("threads", 2)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.stderr_tail.clear()
        self._reader = threading.Thread(
            target=_drain,
            args=(self.proc.stderr, self.stderr_tail),
            name=f"stderr of {self.label}",
            daemon=True,
        )
        self._reader.start()
        self.info = self._read()

    def stderr_text(self) -> str:
        """The tail of the worker's stderr read so far."""
        return "".join(list(self.stderr_tail))

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._reader.join(timeout=5)  # the pipe is at its end once the process is gone (or its children)
            # its last words: the callers keep the first 400-600 characters of the message
            err = f"exit status {self.proc.returncode}: " + self.stderr_text()[-STDERR_MESSAGE_CHARS:]
            raise RuntimeError(f"worker {self.label} died: {err}")
        return json.loads(line)

    def ask(self, op: str, **args) -> dict:
        if self.dead:
            return {"error": "the worker died earlier"}
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            return self._read()
        except (RuntimeError, OSError) as err:  # the process died (a crash in C): report it, the run goes on
            self.dead = True
            self.info["error"] = str(err)[:600]
            return {"error": f"{self.label} died: {str(err)[:600]}"}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.ask("quit")
            except (RuntimeError, BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _drain(stream, tail: collections.deque) -> None:
    """Read ``stream`` to its end, keeping its last lines (each cut to ``STDERR_LINE_CHARS``) in ``tail``."""
    try:
        for line in stream:
            tail.append(line if len(line) <= STDERR_LINE_CHARS else line[:STDERR_LINE_CHARS] + " [cut]\n")
    except (OSError, ValueError):  # the pipe closed under us: nothing more to keep
        pass


def start_all(workers: list[Worker], say=print) -> list[Worker]:
    """Start each worker (one at a time: loads do not overlap); a worker that cannot start is left out."""
    alive = []
    for w in workers:
        try:
            w.start()
            alive.append(w)
            say(
                f"  started {w.label} (load {w.info.get('load_s') or 0:.2f} s, RSS {w.info['rss_mb']:.0f} MB)"
            )
        except Exception as err:  # noqa: BLE001  a peer that cannot run here is reported, not fatal
            say(f"  could not start {w.label}: {str(err)[:400]}")
            w.info = {"error": str(err)[:400]}
    return alive


def restart_all(workers: list[Worker], first: int, say=print) -> None:
    """Stop every worker, then start each again in a fresh process, the start order rotated to begin at
    ``first``; one that cannot start again is marked dead (its later rounds read None)."""
    for w in workers:
        w.stop()
    started = {id(w) for w in start_all(workers[first:] + workers[:first], say)}
    for w in workers:
        w.dead = id(w) not in started


def rounds(
    workers: list[Worker], n_rounds: int, say=print, fresh_every: int = 0
) -> dict[str, list[float | None]]:
    """Every (worker, case) once per round, the order rotated each round; decode tok/s per round.

    ``fresh_every`` K > 0: every K rounds each engine moves to a fresh process, started in a rotated
    order. Two processes of one engine differed by 5% in decode speed for their whole life (two runs of
    benchmarks.native_bench's workers with twins; in both the twin started first was the slower), so a
    ratio with a tighter goal than that needs its median over several processes per engine."""
    configs = [(w, c) for w in workers for c in w.cases]
    results: dict[str, list] = {f"{w.label}|{c}": [] for w, c in configs}
    prefill: dict[str, list] = {k: [] for k in results}
    for r in range(n_rounds):
        if fresh_every > 0 and r > 0 and r % fresh_every == 0:
            restart_all(workers, (r // fresh_every) % len(workers), say)
        shift = r % len(configs)
        for w, c in configs[shift:] + configs[:shift]:
            key = f"{w.label}|{c}"
            if w.dead:
                results[key].append(None)
                prefill[key].append(None)
                continue
            out = w.ask("decode", case=c)
            results[key].append(out.get("tok_s"))
            prefill[key].append(out.get("prefill_ms"))
            if "error" in out:
                say(f"  {key}: {out['error']}")
        say(
            f"  round {r + 1}/{n_rounds}: "
            + ", ".join(
                f"{k.split('|')[0]}[{k.split('|')[1]}] {v[-1]:.0f}" for k, v in results.items() if v and v[-1]
            ).replace("edge-lora ", "ours ")
        )
    return {"tok_s": results, "prefill_ms": prefill}


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(num: list, den: list) -> float | None:
    """Median over rounds of num/den measured in the same round (drift cancels)."""
    pairs = [a / b for a, b in zip(num, den) if a and b]
    return statistics.median(pairs) if pairs else None
