"""benchmarks.pool's worker processes: a worker that logs far more than a pipe holds to stderr still
answers (its stderr is read all the time, not only when it dies), and a worker that dies reports the tail
of its stderr; rounds with ``fresh_every`` move every engine to a new process on schedule."""

from __future__ import annotations

import sys
import threading

from benchmarks import pool

# a worker in pool.Worker's protocol: a JSON line when ready, then a JSON answer per command line, with
# ~1 MB of stderr before each line it writes (a pipe holds 64 KB)
NOISY = r"""
import json, sys
def noise(tag):
    for i in range(8000):
        sys.stderr.write(f"{tag} line {i:05d} " + "x" * 110 + "\n")
    sys.stderr.flush()
noise("load")
print(json.dumps({"rss_mb": 1.0, "load_s": 0.0}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
        break
    noise(cmd["op"])
    if cmd["op"] == "die":
        sys.stderr.write("the last words\n")
        sys.exit(3)
    print(json.dumps({"echo": cmd["op"]}), flush=True)
"""


def _within(seconds: float, fn):
    """``fn()``'s result, or a failure (not a hang) when it takes longer than ``seconds``."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    return thread, out


def test_a_worker_that_floods_stderr_still_answers():
    w = pool.Worker("noisy", {"threads": 1}, [], argv=[sys.executable, "-c", NOISY])
    thread, out = _within(60, lambda: (w.start(), w.ask("hello"), w.ask("again")))
    try:
        assert not thread.is_alive(), "the worker blocked on its stderr (nobody read it)"
        _, first, second = out["value"]
        assert w.info == {"rss_mb": 1.0, "load_s": 0.0}
        assert first == {"echo": "hello"} and second == {"echo": "again"}
        # about 3 MB went by; the tail kept is bounded
        assert len(w.stderr_tail) <= pool.STDERR_LINES
        thread, out = _within(60, lambda: w.ask("die"))
        assert not thread.is_alive()
        assert w.dead and "exit status 3" in out["value"]["error"]
        assert "the last words" in w.info["error"] and "die line 07999" in w.info["error"]
        assert w.ask("hello") == {"error": "the worker died earlier"}
    finally:
        if w.proc and w.proc.poll() is None:
            w.proc.kill()
        w.stop()


def test_long_lines_are_kept_cut():
    tail = pool.collections.deque(maxlen=3)

    class Stream:
        def __iter__(self):
            yield "short\n"
            yield "y" * (pool.STDERR_LINE_CHARS * 5) + "\n"

    pool._drain(Stream(), tail)
    assert list(tail)[0] == "short\n"
    assert len(list(tail)[1]) < pool.STDERR_LINE_CHARS + 10 and list(tail)[1].endswith(" [cut]\n")


# a worker whose "decode" answers with its process id (as tok_s)
PID_WORKER = r"""
import json, os, sys
print(json.dumps({"rss_mb": 1.0, "load_s": 0.0}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "quit":
        break
    print(json.dumps({"tok_s": os.getpid(), "prefill_ms": 1.0}), flush=True)
"""


def test_rounds_move_each_engine_to_a_fresh_process_every_k_rounds_in_a_rotated_start_order(monkeypatch):
    argv = [sys.executable, "-c", PID_WORKER]
    workers = [pool.Worker(name, {"threads": 1}, ["base"], argv=argv) for name in "xyz"]
    starts = []
    real_start = pool.Worker.start

    def start(self):
        real_start(self)
        starts.append(self.label)

    monkeypatch.setattr(pool.Worker, "start", start)
    try:
        alive = pool.start_all(workers, say=lambda _m: None)
        got = pool.rounds(alive, 6, say=lambda _m: None, fresh_every=2)["tok_s"]
    finally:
        for w in workers:
            w.stop()
    for name in "xyz":
        pids = got[f"{name}|base"]
        # rounds 0-1 in one process, 2-3 in a second, 4-5 in a third
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
        assert len({pids[0], pids[2], pids[4]}) == 3
    # the first start in list order, then each restart begins one engine further on
    assert starts == ["x", "y", "z", "y", "z", "x", "z", "x", "y"]
