"""The quickstart: its tasks and scoring, the shipped model, and the whole run in its CI form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_lora.app.cli import main
from edge_lora.app.quickstart.run import DEFAULT_MODEL
from edge_lora.app.quickstart.tasks import STYLES, TASKS, exact_match, score, spell, word_split
from edge_lora.model_dir import ModelDir


def test_tasks_define_answers_that_a_copy_never_matches():
    assert TASKS["mirror"].prompt("cat") == "mirror: c a t =" and TASKS["mirror"].target("cat") == " x z g"
    assert TASKS["shift"].target("azz") == " b a a"
    assert TASKS["count"].target("cats") == "<n4>" and TASKS["count"].new_tokens == ("<n3>", "<n4>", "<n5>")
    for task in TASKS.values():
        items = task.examples(200, "eval")
        assert len({p for p, _ in items}) == 200
        copy = {p: " " + p.split(": ", 1)[1].removesuffix(" =") for p, _ in items}
        answers = dict(items)
        assert score(lambda prompt, copy=copy: copy[prompt] + "\n", items) == 0.0
        assert score(lambda prompt, answers=answers: answers[prompt] + "\nmore", items) == 100.0


def test_style_adapter_learns_the_base_tasks_with_a_suffix_and_trains_one_layer():
    style = STYLES["period"]
    items = style.examples(100, "eval")
    assert len(set(items)) == 100 and all(target.endswith(".") for _, target in items)
    assert {p.split(":")[0] for p, _ in items} == set(style.families)
    assert style.styled([("shift: c a t =", " d b u")]) == [("shift: c a t =", " d b u.")]
    assert style.target_modules(4) == r"model\.layers\.3\..*"


def test_train_and_eval_words_never_overlap():
    for task in TASKS.values():
        train = {p for p, _ in task.examples(3000, "train")}
        evals = {p for p, _ in task.examples(300, "eval")}
        assert not train & evals
    assert word_split("cat") in ("train", "eval")


def test_exact_match_reads_up_to_the_first_newline():
    assert exact_match(" t a c\nreverse: d o g", " t a c")
    assert not exact_match(" t a c a", " t a c")
    assert spell("dog") == "d o g"


def test_shipped_model_is_small_and_loads():
    md = ModelDir(DEFAULT_MODEL)
    size = sum(p.stat().st_size for p in Path(DEFAULT_MODEL).iterdir())
    assert size < 5_000_000
    assert md.config.model_type == "llama" and md.weight_dtype() in ("F16", "BF16")
    assert (Path(DEFAULT_MODEL) / "LICENSE").is_file() and (Path(DEFAULT_MODEL) / "README.md").is_file()


@pytest.mark.slow
def test_quickstart_ci_form_meets_its_targets(tmp_path, capsys):
    rc = main(["quickstart", "--fast", "--json", "--work-dir", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)
    assert [c["what"] for c in summary["checks"] if not c["ok"]] == []
    assert rc == 0
    assert {(r["backend"], r["quant"]) for r in summary["runs"]} == {
        ("onnx", "int8"),
        ("onnx", "int4"),
        ("llamacpp", "q8_0"),
        ("llamacpp", "q4_0"),
    }
    for task in summary["tasks"]:
        assert summary["host"]["base"][task] <= 10 and summary["host"]["adapter"][task] >= 90
        for run in summary["runs"]:
            assert run["base"][task] <= 10
    stacked_on = {run["backend"] for run in summary["runs"] if "stacked" in run}
    assert stacked_on == {"onnx", "llamacpp"}  # stacking and merging ran on every backend
    composing = [name for name, stack in summary["stacks"].items() if stack["composes"]]
    assert composing and any(not stack["composes"] for stack in summary["stacks"].values())
    for run in summary["runs"]:
        if "stacked" in run:
            assert set(run["stacked"]) == set(summary["stacks"]) and run["merged"] >= 85
            for name in composing:  # a task adapter plus a style adapter keeps both effects
                assert min(run["stacked"][name].values()) >= 90
        assert run["tokens_per_s"] > 0 and run["swap_ms"] > 0
    assert (tmp_path / "bundle" / "bundle.json").is_file()
