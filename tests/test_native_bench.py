"""The C library's benchmark rows (benchmarks.native_bench): the per-token rate from callback stamps,
the paired ratios, the workers against the decode rows' specs, the Summary section. No timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import native_bench as nb
from benchmarks import report
from benchmarks.plan import Plan, _our_workers
from benchmarks.pool import median, paired_ratio


def test_decode_rate_counts_the_steps_between_the_first_and_last_token():
    assert nb.decode_rate([10.0, 10.5, 11.0, 12.0]) == pytest.approx(3 / 2.0)
    assert nb.decode_rate([1.0]) is None
    assert nb.decode_rate([]) is None
    assert nb.decode_rate([2.0, 2.0]) is None


def _tok_s() -> dict:
    return {
        f"{nb.LIB}|base": [200.0, 180.0, 190.0],
        f"{nb.LIB}|a": [130.0, 120.0, None],
        f"{nb.LIB}|ab": [100.0, 90.0, 95.0],
        f"{nb.PY}|base": [190.0, 185.0, 170.0],
        f"{nb.PY}|a": [125.0, 110.0, 120.0],
        f"{nb.PY}|ab": [95.0, 92.0, 90.0],
        f"{nb.PEER}|base": [205.0, 175.0, 200.0],
    }


def test_ratios_are_paired_per_round():
    tok_s = _tok_s()
    r = nb.ratios(tok_s)
    assert r["lib/python a"] == pytest.approx(paired_ratio(tok_s[f"{nb.LIB}|a"], tok_s[f"{nb.PY}|a"]))
    assert r["lib/python a"] == pytest.approx(
        (130 / 125 + 120 / 110) / 2
    )  # the round without a value left out
    assert r["lib/llama.cpp base"] == pytest.approx(
        paired_ratio(tok_s[f"{nb.LIB}|base"], tok_s[f"{nb.PEER}|base"])
    )
    assert r["python/llama.cpp base"] == pytest.approx(
        paired_ratio(tok_s[f"{nb.PY}|base"], tok_s[f"{nb.PEER}|base"])
    )
    assert nb.ratios({})["lib/llama.cpp base"] is None


def test_the_python_runtime_and_peer_run_as_in_the_decode_rows():
    plan = Plan.make(False)
    bundle, lib = Path("/b"), Path("/lib/libedge_lora.so")
    native, python, peer = nb.workers(plan, bundle, lib)
    ours = {"bundle": str(bundle), "adapters": ["a", "b"], "extra_adapter": "", "threads": plan.threads}
    ours |= {"prompt": plan.prompt, "new_tokens": plan.new_tokens}
    row = next(w for w in _our_workers(plan, ours) if w.label == nb.PY)
    assert python.spec == row.spec and python.cases == row.cases == nb.CASES
    assert peer.spec == {
        "kind": "peer-llamacpp",
        "gguf": "/b/gguf/model-q4_0.gguf",
        "threads": plan.threads,
        "prompt": plan.prompt,
        "new_tokens": plan.new_tokens,
    }
    assert peer.cases == ["base"]
    assert native.spec["kind"] == "native" and native.spec["library"] == str(lib)
    assert {k: native.spec[k] for k in ("threads", "prompt", "new_tokens", "quant")} == {
        k: python.spec[k] for k in ("threads", "prompt", "new_tokens", "quant")
    }


def _section() -> dict:
    tok_s = _tok_s()
    return {
        "shape": "smollm2-135m",
        "quant": "q4_0",
        "threads": 2,
        "prompt": 64,
        "new_tokens": 32,
        "rounds": 3,
        "medians": {k: median(v) for k, v in tok_s.items()},
        "prefill_ms": {k: 80.0 for k in tok_s},
        "ratios": nb.ratios(tok_s),
        "library": {"path": "/x/libedge_lora.so.0.1.0", "bytes": 252040, "stripped_bytes": 72488},
        "memory": {
            nb.LIB: {
                "interpreter_mb": 15.0,
                "peak_rss_mb": 251.0,
                "peak_above_interpreter_mb": 236.0,
                "libraries": {
                    "/x/libedge_lora.so.0.1.0": 252040,
                    "/l/libllama.so.0": 1000,
                    "/l/libggml.so.0": 24,
                },
            },
            nb.PY: {"error": "Traceback\nRuntimeError: boom"},
        },
    }


def test_markdown_has_the_rows_targets_size_and_memory():
    text = "\n".join(nb.markdown(_section()))
    assert text.startswith("### C library (native/)")
    assert f"| {nb.LIB} | base | 190.0 | 80 |" in text
    r = nb.ratios(_tok_s())
    met = "yes" if r["lib/python base"] >= 1.0 else "**no**"
    assert f"| library / Python runtime (base) | {r['lib/python base']:.2f} | >= 1.0 | {met} |" in text
    met = "yes" if r["lib/llama.cpp base"] >= 0.98 else "**no**"
    assert f"| library / llama.cpp (base) | {r['lib/llama.cpp base']:.2f} | >= 0.98 | {met} |" in text
    assert "libedge_lora.so: 252,040 bytes, 72,488 stripped. It loads llama.cpp's libraries" in text
    assert "(libggml.so.0, libllama.so.0: 1,024 bytes," in text
    assert "251 MB, 236 MB above the bare interpreter" in text
    assert f"Peak RSS, {nb.PY}: n/a (RuntimeError: boom)." in text
    assert "did not run" not in text
    broken = {
        **_section(),
        "workers": {nb.LIB: {"error": "worker died: exit status 1: EL_ERR_IO"}, nb.PY: {}},
    }
    assert f"{nb.LIB} did not run: worker died: exit status 1: EL_ERR_IO" in nb.markdown(broken)


def test_a_library_that_did_not_build_is_one_line():
    lines = nb.markdown({"skipped": "scripts/native-build.sh: the C library did not build: no cmake"})
    assert lines[2] == "Skipped: scripts/native-build.sh: the C library did not build: no cmake"
    assert nb.markdown({"error": "RuntimeError: x"})[2] == "Failed: RuntimeError: x"


def test_the_summary_renders_the_section_only_when_run():
    section = "\n".join(nb.markdown(_section()))
    results = {"summary": {"models": {}}, "models": {}, "native": _section()}
    assert section in report.summary_markdown({**results, **_quality_line()})
    assert "C library (native/)" not in report.summary_markdown({**results, "native": {}, **_quality_line()})


def _quality_line() -> dict:
    return {
        "date": "2026-12-07T00:00:00",
        "wall_s": 60.0,
        "machine": {"cpu": "cpu", "cores": 2},
        "load_average_start": [1.0],
        "load_average_end": [1.0],
    }


def test_library_size_reads_the_real_file(tmp_path):
    real = tmp_path / "libedge_lora.so.0.1.0"
    real.write_bytes(b"\0" * 1000)
    (tmp_path / "libedge_lora.so").symlink_to(real.name)
    size = nb.library_size(tmp_path / "libedge_lora.so")
    assert size["path"] == str(real) and size["bytes"] == 1000
    assert size["stripped_bytes"] is None  # not an ELF file: strip refuses it
