"""One set of token-row checks (edge_lora/token_rows.py) behind every door: `inspect` refuses what adding
refuses, with the same line, and a new token whose string the base already has is refused at training,
at export and `export --add-adapter` (ours and PEFT's), and at the runtime's add on both backends,
naming the token and its base id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from tokenizers import Tokenizer

import runtime
from converters.export import AdapterSource, ExportOptions, add_adapter, export_bundle
from edge_lora.adapter import Adapter
from edge_lora.adapter_format import METADATA_KEY
from edge_lora.app.cli import main
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.safetensors_file import SafetensorsFile, save_tensors


@pytest.fixture(scope="module")
def base(model_dirs):
    return ModelDir(model_dirs["llama"])


@pytest.fixture(scope="module")
def taken(base):
    """``(string, id)`` of a token the base vocabulary has."""
    tok = Tokenizer.from_file(str(base.tokenizer_path))
    return tok.id_to_token(7), 7


def with_tokens(base: ModelDir, tokens: list[str], seed: int = 1) -> Adapter:
    adapter = random_adapter(base, seed, rank=2, modules=["q_proj"], fingerprint=base.fingerprint)
    rows = np.random.default_rng(seed).normal(size=(len(tokens), base.config.hidden_size)).astype(np.float32)
    adapter.added_tokens, adapter.embed_rows, adapter.head_rows = list(tokens), rows, rows.copy()
    return adapter


def rewritten(source: Path, out: Path, **meta) -> Path:
    """``source`` with its metadata changed: a hostile file that only a reader's checks can refuse."""
    f = SafetensorsFile(source)
    data = json.loads(f.metadata[METADATA_KEY])
    data.update(meta)
    save_tensors(out, {k: f.get(k) for k in f.keys()}, {METADATA_KEY: json.dumps(data)})
    return out


def add_error(path: Path, bundle: Path) -> str:
    engine = runtime.load(bundle, backend="llamacpp", device="cpu")
    with pytest.raises(EdgeLoraError) as err:
        engine.add_adapter("x", path)
    return str(err.value)


@pytest.fixture(scope="module")
def bundle(base, tmp_path_factory):
    return build_bundle(base.path, tmp_path_factory.mktemp("tok") / "bundle", {}, backends=("onnx", "gguf"))


def test_inspect_refuses_two_new_tokens_for_one_row_like_adding(base, bundle, tmp_path, capsys):
    good = tmp_path / "one.safetensors"
    with_tokens(base, ["<one>"]).save(good)
    bad = rewritten(good, tmp_path / "two.safetensors", added_tokens=["<one>", "<two>"])
    expected = add_error(bad, bundle)
    assert "does not hold one row for each of the 2 tokens" in expected
    for argv in (["inspect", str(bad)], ["inspect", str(bad), "--base", str(bundle)]):
        capsys.readouterr()
        assert main(argv) == 2  # broken in itself: no base needed to refuse it
        assert capsys.readouterr().err.strip() == f"error: {expected}"


def test_inspect_refuses_replaced_tokens_past_the_vocabulary_like_adding(base, bundle, tmp_path, capsys):
    adapter = random_adapter(base, 2, rank=2, modules=["q_proj"], fingerprint=base.fingerprint)
    rows = np.ones((1, base.config.hidden_size), np.float32)
    adapter.replaced_tokens, adapter.replaced_embed_rows, adapter.replaced_head_rows = [5], rows, rows
    good = tmp_path / "replaces.safetensors"
    adapter.save(good)
    bad = rewritten(good, tmp_path / "past.safetensors", replaced_tokens=[base.config.vocab_size + 3])
    expected = add_error(bad, bundle)
    assert "past the base vocabulary" in expected
    capsys.readouterr()
    assert main(["inspect", str(bad), "--base", str(bundle)]) == 3
    out = capsys.readouterr()
    assert out.err.strip() == f"error: {expected}" and "fits: False" in out.out
    assert main(["inspect", str(good), "--base", str(bundle)]) == 0


def test_a_new_token_the_base_has_is_refused_by_inspect_and_every_add(base, bundle, taken, tmp_path, capsys):
    text, base_id = taken
    path = tmp_path / "shadow.safetensors"
    with_tokens(base, ["<fresh>", text]).save(path)
    needle = f"new token {text!r} is already in the base vocabulary as id {base_id}"
    assert Adapter.load(path).added_tokens == ["<fresh>", text]  # the file itself is well formed
    for backend in ("onnx", "llamacpp"):
        engine = runtime.load(bundle, backend=backend, device="cpu")
        with pytest.raises(EdgeLoraError, match=needle):
            engine.add_adapter("x", path)
        assert engine.adapters == []
    with pytest.raises(EdgeLoraError, match=needle):
        add_adapter(bundle, AdapterSource(path, "x"), show_progress=False)
    assert "x" not in json.loads((bundle / "bundle.json").read_text())["adapters"]
    with pytest.raises(EdgeLoraError, match=needle):
        export_bundle(
            base.path,
            tmp_path / "out",
            [AdapterSource(path, "x")],
            ExportOptions(backends=["gguf"]),
            show_progress=False,
        )
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert main(["inspect", str(path), "--base", str(base.path)]) == 3
    assert needle in capsys.readouterr().err


def test_a_peft_new_token_the_base_has_is_refused_at_import(base, taken, tmp_path):
    from converters.peft import export_peft

    text, base_id = taken
    adapter = with_tokens(base, [text])
    folder = tmp_path / "peft"
    lora = random_adapter(base, 3, rank=2, modules=["q_proj"])
    export_peft(lora, folder)
    # PEFT's way: the resized tables (base rows as they were, one new row) and the tokenizer beside them
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for module, name in (("model.embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        table = np.concatenate([base.get(name), adapter.embed_rows]).astype(np.float32)
        tensors[f"base_model.model.{module}.modules_to_save.weight"] = table
    save_tensors(folder / "adapter_model.safetensors", tensors)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["embed_tokens", "lm_head"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    tok = json.loads(base.tokenizer_path.read_text())
    tok["added_tokens"] = list(tok.get("added_tokens") or []) + [
        {"id": base.config.vocab_size, "content": text, "special": False}
    ]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(
        EdgeLoraError, match=f"new token {text!r} is already in the base vocabulary as id {base_id}"
    ):
        export_bundle(
            base.path,
            tmp_path / "out",
            [AdapterSource(folder, "p")],
            ExportOptions(backends=["gguf"]),
            show_progress=False,
        )


def test_train_add_tokens_names_the_base_id(base, taken):
    from edge_lora.train.data import Formatter

    text, base_id = taken
    with pytest.raises(
        EdgeLoraError, match=f"new token {text!r} is already in the base vocabulary as id {base_id}"
    ):
        Formatter(base, ["<new>", text])
    assert Formatter(base, ["<new>"]).added_tokens == ["<new>"]
