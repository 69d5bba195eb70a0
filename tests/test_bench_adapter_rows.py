"""The benchmark report's adapter rows (issue 16) on the last full run's raw results, plus the peers'
llama.cpp adapters by dtype: which rows count as peers, the ONNX cost row's arithmetic, the dtype table."""

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


def test_onnx_adapter_cost_row(results):
    info = results["models"]["smollm2-135m"]
    targets = report.targets(results, "smollm2-135m", info)
    rows = [t for t in targets if t["target"].startswith("unmerged r16 adapter")]
    assert len(rows) == 1
    tok_s = info["decode"]["tok_s"]
    r = paired_ratio(tok_s["edge-lora onnx int4|base"], tok_s["edge-lora onnx int4|a"])
    stored = report.token_bytes(info, results["plan"], 4, 1, 4)
    share = stored.adapters / (stored.weights + stored.kv_cache)
    assert rows[0]["value"] == pytest.approx((r - 1) / (1.5 * share))
    assert rows[0]["met"] == ((r - 1) <= 1.5 * share)
    names = {t["target"] for t in report.targets(results, "smollm2-135m", info)}
    assert "decode with the adapter vs the best peer's unmerged LoRA" in names


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
