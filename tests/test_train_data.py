"""Training data: the three JSONL shapes, loss masks, chat templates, bad-line reports, packing, splits."""

import json

import numpy as np
import pytest

from edge_lora.errors import EdgeLoraError
from edge_lora.train.config import TrainConfig
from edge_lora.train.data import Formatter, StepSampler, build_examples, collate, pack, read_jsonl, split_eval


def _write(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _targets(fmt, ex):
    return fmt.tokenizer.decode([int(i) for i, m in zip(ex.ids, ex.mask) if m], skip_special_tokens=False)


def test_bad_lines_reported_with_file_and_line(tmp_path):
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"text": "ok"},
            "{not json",
            {"prompt": "p"},
            "",
            {"messages": [{"role": "user", "content": "x"}]},
            {"foo": 1},
            [1, 2],
        ],
    )
    with pytest.raises(EdgeLoraError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert "5 bad line(s)" in msg
    for line in (2, 3, 5, 6, 7):
        assert f"bad.jsonl:{line}:" in msg
    assert "bad.jsonl:1:" not in msg and "\n" not in msg and "hint" in msg


def test_empty_file_and_missing_file(tmp_path):
    with pytest.raises(EdgeLoraError, match="no examples"):
        read_jsonl(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(EdgeLoraError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_text_and_prompt_completion_masks(model_dirs):
    fmt = Formatter(model_dirs["llama"])
    text = fmt.encode({"text": "The quick brown fox"})
    assert text.mask.all() and text.ids[-1] == fmt.eos_id
    pc = fmt.encode({"prompt": "SELECT name", "completion": " FROM users"})
    assert _targets(fmt, pc) == " FROM users<|endoftext|>"
    assert not pc.mask[: len(fmt.tokenizer.encode("SELECT name").ids)].any()


def test_chat_default_template_masks_assistant_turns_only(model_dirs):
    fmt = Formatter(model_dirs["smollm"])
    assert fmt.template_source == "default"
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
    ex = fmt.encode({"messages": msgs})
    assert _targets(fmt, ex) == "hello<|im_end|>\nbye<|im_end|>\n"


def test_chat_uses_the_models_own_template(tmp_path, model_dirs):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    tc["bos_token"] = {"content": "<|im_start|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    fmt = Formatter(d)
    assert fmt.template_source == "model"
    ex = fmt.encode({"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]})
    assert (
        fmt.tokenizer.decode(ex.ids.tolist(), skip_special_tokens=False)
        == "<|im_start|>[INST] 2+2 [/INST] 4<|endoftext|>"
    )
    assert _targets(fmt, ex) == " 4<|endoftext|>"


def test_new_tokens_take_the_ids_after_the_models_rows_when_the_vocab_is_padded(tmp_path, model_dirs):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dirs["qwen2"], d)
    config = json.loads((d / "config.json").read_text())
    tokenizer_size = Formatter(d).base_vocab
    config["vocab_size"] = (
        tokenizer_size + 7
    )  # Qwen2.5 pads its embedding like this (151665 tokens, 151936 rows)
    (d / "config.json").write_text(json.dumps(config))
    fmt = Formatter(d, ["<sql>", "</sql>"])
    ex = fmt.encode({"prompt": "Q <sql>", "completion": " x </sql>"})
    new = [int(i) for i in ex.ids if i >= tokenizer_size]
    assert new == [
        tokenizer_size + 7,
        tokenizer_size + 8,
    ]  # the model's new rows 0 and 1, never a padding row
    assert fmt.encode({"text": "the"}).ids.max() < tokenizer_size


def test_truncation_drop_and_packing(model_dirs):
    fmt = Formatter(model_dirs["llama"])
    records = [
        {"text": "the quick brown fox jumps over the lazy dog " * 5},
        {"prompt": "a long prompt " * 20, "completion": "x"},
        {"text": "short"},
    ]
    examples, stats = build_examples(records, fmt, seq_len=16)
    assert stats["truncated"] == 2 and stats["dropped"] == 1  # the completion fell off the end
    assert all(len(e.ids) <= 16 for e in examples)
    packed = pack(examples, 32)  # whole examples per row, each tagged with its segment
    assert len(packed) == 1 and packed[0].segments.tolist() == [0] * len(examples[0].ids) + [1] * len(
        examples[1].ids
    )
    assert not packed[0].mask[len(examples[0].ids)]  # a packed example's first token is no target
    assert packed[0].targets == sum(e.targets for e in examples)
    assert [len(e.ids) for e in pack(examples, 16)] == [
        len(e.ids) for e in examples
    ]  # never split an example
    ids, targets, segments = collate(examples, pad_id=0)
    assert (
        ids.shape == (2, 16)
        and segments is None
        and not targets[:, 0].any()
        and targets[1].sum() == len(examples[1].ids) - 1
    )
    ids, targets, segments = collate(packed + [examples[1]], pad_id=0)
    assert (
        segments.shape == ids.shape
        and segments[1].max() == 0
        and (segments[1, len(examples[1].ids) :] == -1).all()
    )


def test_eval_split_is_seeded_and_disjoint(model_dirs):
    fmt = Formatter(model_dirs["llama"])
    examples, _ = build_examples([{"text": f"line {i}"} for i in range(40)], fmt, 32)
    a_train, a_eval = split_eval(examples, 0.1, seed=3)
    b_train, b_eval = split_eval(examples, 0.1, seed=3)
    assert len(a_eval) == 4 and len(a_train) == 36
    assert [e.ids.tolist() for e in a_eval] == [e.ids.tolist() for e in b_eval]
    assert split_eval(examples, 0.0, 0)[1] == []


def test_step_sampler_is_a_pure_function_of_the_step():
    s = StepSampler(10, 4, seed=1)
    assert s.steps_per_epoch == 3
    first_epoch = np.concatenate([s.step(i) for i in range(3)])
    assert set(first_epoch[:10].tolist()) == set(range(10))  # a permutation, wrapping at the end
    again = StepSampler(10, 4, seed=1)
    assert np.array_equal(again.step(4), s.step(4)) and not np.array_equal(s.step(0), s.step(3))


def test_config_file_flags_win_and_tolerant_keys(tmp_path, capsys):
    import argparse

    from edge_lora.train.cli import add_train_arguments, config_from_args

    (tmp_path / "c.yaml").write_text(
        "rank: 32\nseq-len: '128'\ndora: yes\ntypo_key: 1\nadd_tokens: [<a>, <b>]\n"
    )
    parser = add_train_arguments(argparse.ArgumentParser())
    cfg = config_from_args(
        parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--rank", "4", "--no-dora"])
    )
    assert cfg.rank == 4 and cfg.seq_len == 128 and cfg.dora is False and cfg.add_tokens == ["<a>", "<b>"]
    assert "typo_key" in capsys.readouterr().err
    with pytest.raises(EdgeLoraError, match="rank"):
        TrainConfig.from_dict({"rank": "many"})
