"""Activated LoRA (aLoRA, PEFT's ``alora_invocation_tokens``) in the trainer: the positions it acts on
equal PEFT's, logits equal PEFT's through an exported adapter, the prompt before the invocation is the
base's exactly, and ``edge-lora train --alora-invocation`` end to end with its refusals."""

import json
import random

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft.tuners.lora.variants import calculate_alora_offsets
from tiny_models import load_hf
from tiny_models import quick_train_config as quick_cfg

from converters.peft import export_peft
from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.train.cli import main as cli_main
from edge_lora.train.data import Formatter, build_examples, collate, invocation_start
from edge_lora.train.lora import LoraConfig, activation_mask, apply_lora, lora_layers, merge_all, to_adapter
from edge_lora.train.model import CausalLM
from edge_lora.train.trainable_model import TrainModule
from edge_lora.train.trainer import train

INVOCATION = [7, 31, 19]  # ids for the model-level tests (any base ids will do)
INVOCATION_TEXT = "<|im_start|>answer"  # a special token first: it tokenizes alike alone and in context
WORDS = "the quick brown fox jumps over lazy dog select name from users where id".split()


def ids_without(rng: torch.Generator, shape: tuple[int, int], vocab: int, tokens=INVOCATION) -> torch.Tensor:
    """Random ids in which ``tokens`` never occurs (so placed copies are the only ones)."""
    ids = torch.randint(0, vocab, shape, generator=rng)
    ids[ids == tokens[0]] = tokens[0] + 1
    return ids


def place(ids: torch.Tensor, row: int, at: int, tokens=INVOCATION) -> None:
    ids[row, at : at + len(tokens)] = torch.tensor(tokens)


def peft_mask(ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The mask PEFT's ALoraLinearVariant builds from calculate_alora_offsets (offsets from the end)."""
    offsets = calculate_alora_offsets(
        {"default": PeftLoraConfig(alora_invocation_tokens=tokens, task_type="CAUSAL_LM")}, "default", ids
    )
    t = ids.shape[1]
    offs = torch.tensor([0 if o is None else min(int(o), t) for o in offsets])
    return torch.arange(t)[None] >= (t - offs)[:, None]


def test_positions_equal_peft_with_padding_on_either_side():
    rng = torch.Generator().manual_seed(0)
    ids = ids_without(rng, (6, 24), 300)
    place(ids, 0, 5)  # one occurrence
    place(ids, 1, 2), place(ids, 1, 14)  # two: the last one counts
    place(ids, 2, 21)  # at the very end
    place(ids, 3, 0)  # at the very start
    ids[4, 9:11] = torch.tensor(INVOCATION[:2])  # only a prefix: no occurrence
    # row 5: none. Then the same rows padded on the left and on the right (pad id 0)
    for padded in (ids, torch.nn.functional.pad(ids, (5, 0)), torch.nn.functional.pad(ids, (0, 5))):
        ours = activation_mask(padded, INVOCATION)
        assert torch.equal(ours, peft_mask(padded, INVOCATION))
    mask = activation_mask(ids, INVOCATION)
    assert mask[0].nonzero()[0].item() == 5 and mask[1].nonzero()[0].item() == 14
    assert mask[3].all() and not mask[4].any() and not mask[5].any()


def test_packed_rows_activate_per_example():
    rng = torch.Generator().manual_seed(1)
    lengths = [9, 12, 7, 10]
    rows = [ids_without(rng, (1, n), 300)[0] for n in lengths]
    rows[0][2:5] = torch.tensor(INVOCATION)
    rows[1][3:6] = torch.tensor(INVOCATION)
    rows[1][8:11] = torch.tensor(INVOCATION)
    # rows[2]: none; rows[3]: an occurrence that straddles the boundary with rows[2] must not count
    rows[2][-2:] = torch.tensor(INVOCATION[:2])
    rows[3][0] = INVOCATION[2]
    packed = torch.cat(rows)[None]
    segments = torch.cat([torch.full((n,), k, dtype=torch.int32) for k, n in enumerate(lengths)])[None]
    packed = torch.nn.functional.pad(packed, (0, 4))  # and padding, segment -1
    segments = torch.nn.functional.pad(segments, (0, 4), value=-1)
    got = activation_mask(packed, INVOCATION, segments)
    want = torch.cat([activation_mask(r[None], INVOCATION)[0] for r in rows] + [torch.zeros(4, dtype=bool)])
    assert torch.equal(got[0], want)


def activated_model(model_dir, *, rslora=False, seed=0, dropout=0.0):
    """Our model with an activated adapter on every linear layer, B random (so it moves the logits)."""
    model = CausalLM.from_model_dir(model_dir).eval()
    torch.manual_seed(seed)
    apply_lora(
        model, LoraConfig(rank=4, alpha=8, rslora=rslora, dropout=dropout, invocation_tokens=INVOCATION)
    )
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("family, rslora", [("llama", False), ("qwen2", True)])
def test_exported_adapter_gives_peft_logits(model_dirs, tmp_path, family, rslora):
    md = ModelDir(model_dirs[family])
    ours = activated_model(md.path, rslora=rslora)
    to_adapter(ours, LoraConfig(rslora=rslora), md.fingerprint).save(tmp_path / "a.safetensors")
    adapter = Adapter.load(tmp_path / "a.safetensors", base=md.config, base_fingerprint=md.fingerprint)
    assert adapter.invocation_tokens == INVOCATION
    export_peft(adapter, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["alora_invocation_tokens"] == (
        INVOCATION
    )
    base_hf = load_hf(md.path)
    with torch.no_grad():
        base_logits = {}
        rng = torch.Generator().manual_seed(2)
        invoked = ids_without(rng, (3, 20), md.config.vocab_size)
        place(invoked, 0, 8), place(invoked, 1, 3), place(invoked, 1, 12), place(invoked, 2, 16)
        plain = ids_without(rng, (2, 20), md.config.vocab_size)
        for name, ids in (("invoked", invoked), ("plain", plain)):
            base_logits[name] = base_hf(ids).logits.clone()
        peft_model = PeftModel.from_pretrained(base_hf, tmp_path / "peft").eval()
        assert peft_model.peft_config["default"].alora_invocation_tokens == INVOCATION
        for name, ids in (("invoked", invoked), ("plain", plain)):
            want = peft_model(ids).logits
            got = ours(ids)
            diff = (got - want).abs().max().item()
            print(f"{family} {name}: ours vs peft max |diff| {diff:.2e}")
            assert diff < 1e-4
        # it mattered: after the invocation the adapter moved the logits; without one it is the base
        assert (ours(invoked) - base_logits["invoked"]).abs().max() > 1e-2
        assert (ours(plain) - base_logits["plain"]).abs().max() < 1e-4


def test_positions_before_the_invocation_are_the_base_exactly(model_dirs):
    path = model_dirs["mistral"]
    base = CausalLM.from_model_dir(path).eval()
    ours = activated_model(path)
    rng = torch.Generator().manual_seed(3)
    ids = ids_without(rng, (2, 24), 300)
    place(ids, 0, 10), place(ids, 1, 4), place(ids, 1, 17)
    with torch.no_grad():
        want, got = base(ids), ours(ids)
    for row, start in ((0, 10), (1, 17)):
        assert (got[row, :start] - want[row, :start]).abs().max().item() < 1e-6
        assert (got[row, start:] - want[row, start:]).abs().max().item() > 1e-3
    with torch.no_grad():  # a plain row is the base everywhere, bit for bit
        plain = ids_without(rng, (1, 24), 300)
        assert torch.equal(ours(plain), base(plain))
    with pytest.raises(EdgeLoraError, match="cannot be merged"):
        merge_all(ours)


def test_packed_and_checkpointed_training_pass_equal_the_plain_one(model_dirs):
    """A packed row's loss and gradients equal its examples' one by one (activation per example), and
    gradient checkpointing recomputes with the same positions."""
    model = activated_model(model_dirs["llama"])
    module = TrainModule(model).train()
    rng = torch.Generator().manual_seed(4)
    rows = [ids_without(rng, (1, n), 300)[0] for n in (11, 14)]
    rows[0][3:6] = torch.tensor(INVOCATION)
    rows[1][7:10] = torch.tensor(INVOCATION)
    params = [p for p in module.parameters() if p.requires_grad]

    def loss_and_grads(ids, targets, segments=None):
        for p in params:
            p.grad = None
        loss = module(ids, targets, segments)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    from edge_lora.train.data import Example, pack

    examples = [Example(r.numpy(), np.ones(len(r), bool)) for r in rows]
    one, g_one = loss_and_grads(*collate(examples[:1])[:2])
    two, g_two = loss_and_grads(*collate(examples[1:])[:2])
    packed, g_packed = loss_and_grads(*collate(pack(examples, 32)))
    assert torch.allclose(packed, one + two, atol=1e-5)
    assert all(torch.allclose(p, a + b, atol=1e-5) for p, a, b in zip(g_packed, g_one, g_two))
    model.gradient_checkpointing = True
    again, g_again = loss_and_grads(*collate(pack(examples, 32)))
    assert torch.allclose(again, packed, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_again, g_packed))
    assert any(g.abs().max() > 0 for g in g_packed)


def make_data(path, n=16, seed=0, invocation=INVOCATION_TEXT):
    rng = random.Random(seed)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            f.write(
                json.dumps({"prompt": "Q: " + sent(5) + invocation, "completion": " A: " + sent(4)}) + "\n"
            )
    return path


def test_cli_trains_an_activated_adapter(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl")
    out = tmp_path / "a.safetensors"
    args = ["--model", str(model_dirs["qwen2"]), "--data", str(data), "--out", str(out)]
    args += ["--steps", "3", "--rank", "4", "--seq-len", "48", "--batch-size", "4", "--lr", "1e-2"]
    rc = cli_main([*args, "--alora-invocation", INVOCATION_TEXT, "--no-progress", "--threads", "1"])
    assert rc == 0
    md = ModelDir(model_dirs["qwen2"])
    adapter = Adapter.load(out, base=md.config, base_fingerprint=md.fingerprint)
    tokens = Formatter(md).invocation_tokens(INVOCATION_TEXT)
    assert adapter.activated and adapter.invocation_tokens == tokens and len(tokens) > 1
    assert adapter.extra["alora_invocation"] == INVOCATION_TEXT
    assert adapter.extra["settings"]["alora_invocation"] == INVOCATION_TEXT
    assert any(np.abs(w.b).max() > 0 for w in adapter.modules.values())  # it trained


def test_packed_run_from_a_config_file(tmp_path, model_dirs):
    data = make_data(tmp_path / "d.jsonl", n=12)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"alora-invocation": INVOCATION_TEXT, "packing": True}))
    out = tmp_path / "a.safetensors"
    args = ["--config", str(config), "--model", str(model_dirs["llama"]), "--data", str(data)]
    args += ["--out", str(out), "--steps", "2", "--rank", "4", "--seq-len", "64", "--batch-size", "2"]
    assert cli_main([*args, "--eval-split", "0.2", "--no-progress", "--threads", "1"]) == 0
    assert Adapter.load(out).invocation_tokens == Formatter(model_dirs["llama"]).invocation_tokens(
        INVOCATION_TEXT
    )


def test_dora_is_refused(tmp_path, model_dirs, capsys):
    data = make_data(tmp_path / "d.jsonl", n=4)
    out = tmp_path / "a.safetensors"
    args = ["--model", str(model_dirs["llama"]), "--data", str(data), "--out", str(out), "--no-progress"]
    assert cli_main([*args, "--alora-invocation", INVOCATION_TEXT, "--dora"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dora" in err and "\n" not in err and not out.exists()
    with pytest.raises(EdgeLoraError, match="cannot be DoRA"):
        apply_lora(CausalLM.from_model_dir(model_dirs["llama"]), LoraConfig(dora=True, invocation_tokens=[1]))
    assert cli_main([*args, "--alora-invocation", ""]) == 2
    assert "alora-invocation is empty" in capsys.readouterr().err


def test_data_without_the_invocation_is_refused(tmp_path, model_dirs, capsys):
    data = make_data(tmp_path / "d.jsonl", n=6)
    with open(data, "a") as f:  # examples 7 and 8 lack it
        f.write(json.dumps({"prompt": "Q: fox", "completion": " A: dog"}) + "\n")
        f.write(json.dumps({"text": "select name from users"}) + "\n")
    out = tmp_path / "a.safetensors"
    args = ["--model", str(model_dirs["llama"]), "--data", str(data), "--out", str(out), "--no-progress"]
    assert cli_main([*args, "--alora-invocation", INVOCATION_TEXT]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not out.exists()
    assert str(data) in err and "2 of 8 examples lack the aLoRA invocation" in err and "examples 7, 8" in err
    assert "right before each response" in err


def test_invocation_after_every_target_is_refused_and_targets_before_it_counted(model_dirs):
    fmt = Formatter(model_dirs["smollm"])
    tokens = fmt.invocation_tokens(INVOCATION_TEXT)
    late = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "then" + INVOCATION_TEXT},
        ]
    }
    with pytest.raises(EdgeLoraError, match=r"d\.jsonl: in 1 of 2 examples no target token follows"):
        build_examples(
            [{"text": "x" + INVOCATION_TEXT + " y"}, late], fmt, 64, invocation=tokens, path="d.jsonl"
        )
    # a text example trains on its prompt too: those targets come before the invocation and are counted
    examples, stats = build_examples(
        [{"text": "fox" + INVOCATION_TEXT + " dog"}, {"prompt": "Q" + INVOCATION_TEXT, "completion": " A"}],
        fmt,
        64,
        invocation=tokens,
    )
    assert stats["before_invocation"] == 1 and len(examples) == 2
    assert invocation_start(examples[1].ids, tokens) >= 0


def test_plain_lora_layers_carry_no_activation(model_dirs):
    model = CausalLM.from_model_dir(model_dirs["llama"])
    apply_lora(model, LoraConfig(rank=2))
    assert model.alora is None and all(layer.activation is None for layer in lora_layers(model).values())
    assert to_adapter(model, LoraConfig(rank=2), None).invocation_tokens == []


def test_trained_adapter_leaves_the_prompt_to_the_base(tmp_path, model_dirs):
    """After a real run, loaded back from its file: the logits before the invocation are the base's,
    those from it on are the adapter's."""
    data = make_data(tmp_path / "d.jsonl", n=8)
    cfg = quick_cfg(
        tmp_path, model_dirs["smollm"], data, steps=6, eval_split=0, alora_invocation=INVOCATION_TEXT
    )
    train(cfg)
    md = ModelDir(model_dirs["smollm"])
    adapter = Adapter.load(cfg.out, base=md.config)
    from edge_lora.train.lora import load_adapter_into

    base = CausalLM.from_model_dir(md.path).eval()
    ours = CausalLM.from_model_dir(md.path).eval()
    load_adapter_into(ours, adapter)
    assert ours.alora is not None and ours.alora.tokens == adapter.invocation_tokens
    ex = Formatter(md).encode(json.loads(open(data).readline()))
    start = invocation_start(ex.ids, adapter.invocation_tokens)
    ids = torch.from_numpy(ex.ids)[None]
    with torch.no_grad():
        got, want = ours(ids), base(ids)
    assert (got[0, :start] - want[0, :start]).abs().max().item() < 1e-6
    assert (got[0, start:] - want[0, start:]).abs().max().item() > 1e-3
