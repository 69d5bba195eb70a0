"""The benchmark report's adapter rows (issue 16) on the last full run's raw results, plus the peers'
llama.cpp adapters by dtype: which rows count as peers, the issue-24 rows' arithmetic, the dtype table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.pool import paired_ratio

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "2026-11-23.json"


@pytest.fixture(scope="module")
def results():
    if not RESULTS.is_file():
        pytest.skip("no stored full benchmark run")
    return json.loads(RESULTS.read_text())


def test_llama_cpp_running_our_files_is_no_peer():
    assert report._is_peer("llama.cpp q4_0 lora_path convert f16|a")
    assert report._is_peer("ORT GenAI builder int4 +LoRA baked|a")
    assert not report._is_peer("llama.cpp q4_0 lora_path edge-lora f16|a")
    assert not report._is_peer("edge-lora onnx int4|a")
    tok_s = {"llama.cpp q4_0|base": [1.0]}
    assert report._peer_base(tok_s, "llama.cpp q4_0 lora_path convert q8_0|a") == "llama.cpp q4_0|base"


def test_issue_24_rows_from_a_stored_run(results):
    """The adapter-cost, same-graph and stacking rows recomputed by hand from the stored run's rounds."""
    info = results["models"]["smollm2-135m"]
    rows = {t["target"]: t for t in report.targets(results, "smollm2-135m", info)}
    tok_s = info["decode"]["tok_s"]
    ours = paired_ratio(tok_s["edge-lora onnx int4|base"], tok_s["edge-lora onnx int4|a"]) - 1
    llama = min(
        paired_ratio(tok_s["llama.cpp q4_0|base"], tok_s[k]) - 1
        for k in tok_s
        if k.startswith("llama.cpp q4_0 lora_path") and report._is_peer(k)
    )
    cost = rows["adapter's extra time per token / llama.cpp's (its cheapest file)"]
    assert cost["value"] == pytest.approx(ours / llama)
    assert cost["met"] == (ours <= llama)
    same = rows["ours / ORT GenAI on the same graph (a)"]
    assert same["value"] == pytest.approx(
        paired_ratio(tok_s["edge-lora onnx int4|a"], tok_s["ORT GenAI on our int4 +og.Adapters|a"])
    )
    two = paired_ratio(tok_s["edge-lora onnx int4|base"], tok_s["edge-lora onnx int4|ab"]) - 1
    stack = rows["two stacked / one adapter, extra time per token (edge-lora onnx int4)"]
    assert stack["value"] == pytest.approx(two / ours)
    assert stack["met"] == (two / ours <= 1.6)
    assert "decode with the adapter vs the best peer's unmerged LoRA" in rows
    assert "base requests (adapters added) vs ORT GenAI builder's base decode" in rows


def test_dtype_table_pairs_each_file_with_its_base(results):
    info = json.loads(json.dumps(results["models"]["smollm2-135m"]))
    tok_s = info["decode"]["tok_s"]
    base = tok_s["llama.cpp q4_0|base"]
    tok_s["llama.cpp q4_0 lora_path convert f16|a"] = [b * 0.5 for b in base]
    info["lora_files"] = {"convert f16": {"mb": 9.8}}
    lines = report.dtype_markdown("smollm2-135m", info)
    row = next(line for line in lines if "convert f16" in line)
    rate = report.median(tok_s["llama.cpp q4_0 lora_path convert f16|a"])
    assert row == f"| q4_0 | convert f16 | 9.8 | {rate:.1f} | 0.50 |"
    assert any("| edge-lora f32 |" in line for line in lines)  # the bundle's own file, as before
