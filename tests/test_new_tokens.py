"""Adapters that add tokens, on both backends: ours (``Adapter.embed_rows`` / ``head_rows``), PEFT's
``trainable_token_indices`` and resized embeddings in ``modules_to_save``, each exported by the real
``export_bundle`` and run through ``runtime.load`` against transformers + PEFT (fp32 logits and greedy
tokens; 4-bit greedy agreement); the per-request vocabulary, clashes, and the import refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from factories import random_adapter
from tiny_models import load_hf, quick_train_config

from converters.export import AdapterSource, ExportOptions, export_bundle
from converters.peft import export_peft, import_peft
from edge_lora.adapter import Adapter
from edge_lora.app.describe import describe
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format.layout import read_layout
from runtime.new_tokens import combine
from runtime.sampling import SamplingParams

NEW = ["<sql>", "</sql>"]
FAMILIES = ["llama", "smollm"]  # an untied head (its own output rows) and a tied one (the embedding rows)
KINDS = ["ours", "peft_tt", "peft_ms"]
BACKENDS = {"onnx": ("fp32", "int4"), "llamacpp": ("f32", "q4_0")}


def _ours(md: ModelDir, seed: int = 1, tokens=NEW) -> Adapter:
    rng = np.random.default_rng(seed)
    adapter = random_adapter(md, seed=seed, rank=2, b_std=0.05, mixed_ranks=1)
    hidden = md.config.hidden_size
    adapter.added_tokens = list(tokens)
    adapter.embed_rows = rng.normal(0, 1.0, (len(tokens), hidden)).astype(np.float32)
    if not md.config.tie_word_embeddings:
        adapter.head_rows = rng.normal(0, 1.0, (len(tokens), hidden)).astype(np.float32)
    return adapter


def _resized(md: ModelDir):
    model = load_hf(md.path)
    model.resize_token_embeddings(md.config.vocab_size + len(NEW), mean_resizing=False)
    return model


def _reference_ours(md: ModelDir, adapter: Adapter, tmp):
    """transformers with the embedding grown by the adapter's rows, plus PEFT's LoRA of the adapter."""
    import torch
    from peft import PeftModel

    model, v = _resized(md), md.config.vocab_size
    with torch.no_grad():
        model.get_input_embeddings().weight[v:] = torch.from_numpy(adapter.embed_rows)
        if adapter.head_rows is not None:
            model.lm_head.weight[v:] = torch.from_numpy(adapter.head_rows)
    lora = copy.copy(adapter)
    lora.added_tokens, lora.embed_rows, lora.head_rows = [], None, None
    return PeftModel.from_pretrained(model, export_peft(lora, tmp / "ours_peft")).eval()


def _peft_with_tokens(md: ModelDir, kind: str, out):
    """A PEFT model trained (here: rows set at random) with new tokens, saved with its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PreTrainedTokenizerFast

    v = md.config.vocab_size
    tokenizer = PreTrainedTokenizerFast.from_pretrained(md.path)
    tokenizer.add_tokens(NEW)
    # trainable tokens on the two new ids and on base id 3 (its row replaced while the adapter is active)
    extra = (
        {"trainable_token_indices": {"embed_tokens": [v, v + 1, 3]}}
        if kind == "peft_tt"
        else {"modules_to_save": ["embed_tokens", "lm_head"]}
    )
    model = get_peft_model(
        _resized(md), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra)
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            if "modules_to_save" in name:  # the new rows only; a tied base's two copies stay equal
                p[v:] = torch.randn(p[v:].shape, generator=torch.Generator().manual_seed(11))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, model_dirs, tmp_path_factory):
    """One bundle per family from ``export_bundle`` (ONNX fp32 + int4, GGUF f32 + q4_0) with three
    adapters that add the same two tokens, and each one's transformers + PEFT reference."""
    md = ModelDir(model_dirs[request.param])
    tmp = tmp_path_factory.mktemp(f"new_tokens_{request.param}")
    ours = _ours(md)
    ours.save(tmp / "ours.safetensors")
    refs = {"ours": _reference_ours(md, ours, tmp)}
    for kind in ("peft_tt", "peft_ms"):
        refs[kind] = _peft_with_tokens(md, kind, tmp / kind)
    sources = [
        AdapterSource(tmp / "ours.safetensors", "ours"),
        AdapterSource(tmp / "peft_tt", "peft_tt"),
        AdapterSource(tmp / "peft_ms", "peft_ms"),
    ]
    options = ExportOptions(
        backends=["onnx", "gguf"], onnx_quants=["fp32", "int4"], gguf_quants=["f32", "q4_0"]
    )
    root = export_bundle(md.path, tmp / "bundle", sources, options, show_progress=False)
    return md, root, refs


def _prompt(md: ModelDir) -> list[int]:
    v = md.config.vocab_size
    return [5, 3, 17, v, 40, 41, v + 1, 3, 9, v, 12]  # id 3: its row is replaced by peft_tt


def _engine(root, backend: str, quant: str):
    import runtime

    options = {"quant": quant, **({"precise": True} if backend == "llamacpp" else {})}
    return runtime.load(root, backend=backend, **options)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def _ref_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_fp32_matches_transformers_and_peft(setup, backend):
    md, root, refs = setup
    engine = _engine(root, backend, BACKENDS[backend][0])
    ids = _prompt(md)
    base_engine = _engine(root, backend, BACKENDS[backend][0])  # never sees an adapter
    for kind in KINDS:
        engine.add_adapter(kind)
        want = _ref_logits(refs[kind], ids)
        got = engine.logits(ids, adapters={kind: 1.0})
        assert got.shape == (len(ids), md.config.vocab_size + len(NEW))
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
        steps = 8
        greedy = engine.generate_ids(ids, SamplingParams(max_new_tokens=steps), adapters={kind: 1.0})
        assert greedy == _greedy(refs[kind], ids, steps)[: len(greedy)] and len(greedy) > 0
    # a request without the adapters: the base vocabulary, the base-only engine's logits exactly
    base_ids = [t for t in ids if t < md.config.vocab_size]
    plain = engine.logits(base_ids, adapters={})
    assert plain.shape == (len(base_ids), md.config.vocab_size)
    np.testing.assert_array_equal(plain, base_engine.logits(base_ids))
    with pytest.raises(EdgeLoraError, match="outside the vocabulary"):
        engine.logits(ids, adapters={})


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_4bit_greedy_agrees_with_peft(setup, backend):
    md, root, refs = setup
    engine = _engine(root, backend, BACKENDS[backend][1])
    ids = _prompt(md)
    for kind in KINDS:
        engine.add_adapter(kind)
        want, got = _ref_logits(refs[kind], ids), engine.logits(ids, adapters={kind: 1.0})
        v = md.config.vocab_size
        # 4-bit weights move every logit of a random tiny model (near-flat, full of near-ties); the new
        # tokens' columns must move no more than the base's, and greedy choices agree wherever the
        # reference's margin exceeds what quantization moves the base columns
        # (relative to each part's own logit scale: the test's new rows are far larger than the base's)
        err = np.abs(want - got)
        base_rel = err[:, :v].max() / np.abs(want[:, :v]).max()
        new_rel = err[:, v:].max() / np.abs(want[:, v:]).max()
        top2 = np.sort(want, -1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 2 * err.max(-1)
        agree = want.argmax(-1) == got.argmax(-1)
        print(
            f"{backend} 4-bit {kind}: top-1 agreement {agree.mean():.2f}, "
            f"decisive {decisive.sum()}/{len(ids)}, "
            f"max |diff| / max |logit|: base {base_rel:.3f}, new tokens {new_rel:.3f}"
        )
        assert new_rel <= 2 * base_rel + 0.03  # a lost or misplaced row moves its logits by ~100%
        assert agree[decisive].all() and agree.mean() >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_tokenizer_per_request_and_clash(setup, backend):
    md, root, _ = setup
    engine = _engine(root, backend, BACKENDS[backend][0])
    engine.add_adapter("ours")
    v = md.config.vocab_size
    text = "a <sql>b</sql>"
    with_tokens = engine.tokenizer_for({"ours": 1.0})
    assert with_tokens.encode(text, add_special_tokens=False).count(v) == 1
    assert v + 1 in with_tokens.encode(text, add_special_tokens=False)
    assert with_tokens.decode(with_tokens.encode(text, add_special_tokens=False)) == text
    assert v not in engine.tokenizer_for({}).encode(text) and engine.tokenizer.encode(
        text
    ) == engine.tokenizer_for({}).encode(text)
    # the prompt string reaches the model with the new ids, and sampled new ids decode to their strings
    out = engine.generate(text, max_new_tokens=6, adapters={"ours": 1.0})
    ids = engine.generate_ids(
        with_tokens.encode(text), SamplingParams(max_new_tokens=6), adapters={"ours": 1.0}
    )
    assert with_tokens.decode(ids).startswith(out)  # the stream holds back a trailing partial UTF-8 character
    assert with_tokens.decode([v + 1, 5, v]).startswith("</sql>") and with_tokens.decode(
        [v + 1, 5, v]
    ).endswith("<sql>")
    # same strings at the same ids with other rows: a clash, named
    other = _ours(md, seed=5)
    other_path = root.parent / "other.safetensors"
    other.save(other_path)
    engine.add_adapter("other", other_path)
    with pytest.raises(
        EdgeLoraError, match="'other' and 'ours' both define token '<sql>' with different rows"
    ):
        engine.generate(text, max_new_tokens=2, adapters={"ours": 1.0, "other": 1.0})
    assert engine.logits([5, v], adapters={"other": 1.0}).shape == (2, v + 2)  # alone it runs


def test_combine_rules(model_dirs):
    md = ModelDir(model_dirs["llama"])
    a, b = _ours(md, seed=1), _ours(md, seed=1)
    vocab = combine([("a", a), ("b", b)], md.config)  # equal rows: one vocabulary
    assert vocab.tokens == tuple(NEW) and vocab.size == md.config.vocab_size + 2
    longer = _ours(md, seed=1, tokens=NEW + ["<x>"])
    longer.embed_rows[:2], longer.head_rows[:2] = a.embed_rows, a.head_rows
    assert combine([("a", a), ("l", longer)], md.config).tokens == (*NEW, "<x>")
    swapped = _ours(md, seed=1, tokens=NEW[::-1])
    with pytest.raises(EdgeLoraError, match="both define token id"):
        combine([("a", a), ("s", swapped)], md.config)
    shifted = _ours(md, seed=1, tokens=["<y>", "<sql>"])
    with pytest.raises(EdgeLoraError, match="both define token id"):
        combine([("a", a), ("s", shifted)], md.config)
    assert combine([("plain", random_adapter(md, seed=2, mixed_ranks=1))], md.config).n == 0


def test_peft_trained_base_table_and_missing_tokenizer_are_refused(model_dirs, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from converters.peft_tokens import model_dir_rows

    md = ModelDir(model_dirs["llama"])
    v = md.config.vocab_size
    model = get_peft_model(
        _resized(md), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name and "embed_tokens" in name:
                p[3] += 1.0  # a base token's row trained: the whole table is a change of the base
    model.save_pretrained(tmp_path / "p")
    with pytest.raises(EdgeLoraError, match="rows of the base vocabulary differ from the base's"):
        import_peft(tmp_path / "p", base=md.config, base_rows=model_dir_rows(md))
    model_ok = get_peft_model(
        _resized(md),
        LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [v, v + 1]}),
    )
    model_ok.save_pretrained(tmp_path / "q")
    with pytest.raises(EdgeLoraError, match="no tokenizer.json beside it"):
        import_peft(tmp_path / "q", base=md.config, base_rows=model_dir_rows(md))
    with pytest.raises(EdgeLoraError, match="cannot be checked against the base"):
        import_peft(tmp_path / "q", base=md.config)


@pytest.mark.slow
def test_inspect_shows_added_tokens(setup):
    _, root, _ = setup
    info = describe(root)
    assert all(info["adapters"][k]["added_tokens"] == "2: '<sql>', '</sql>'" for k in KINDS)
    assert describe(root / "adapters" / "ours.safetensors")["added_tokens"] == "2: '<sql>', '</sql>'"
    assert all(
        k in info["adapters"][n]["backends"] for n in KINDS for k in ("onnx", "gguf")
    )  # nothing refused


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_with_add_tokens_exports_and_runs(tmp_path, model_dirs, family):
    """`edge-lora train --add-tokens` (the trainer API), `edge-lora export` and `edge-lora inspect` on the
    CLI, then both backends greedy-decode what transformers + PEFT decode from the same adapter."""
    import json

    from edge_lora.app.cli import main as cli_main
    from edge_lora.train.trainer import train

    md = ModelDir(model_dirs[family])
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i} <sql>", "completion": f" SELECT {i} </sql>"}) + "\n"
            for i in range(12)
        )
    )
    train(
        quick_train_config(
            tmp_path,
            md.path,
            data,
            out=str(tmp_path / "a.safetensors"),
            steps=6,
            lr=3e-2,
            add_tokens=NEW,
            targets="attention",
            eval_split=0,
        )
    )
    adapter = Adapter.load(tmp_path / "a.safetensors", base=md.config)
    assert (
        cli_main(
            [
                "export",
                str(md.path),
                "--out",
                str(tmp_path / "b"),
                "--adapter",
                f"{tmp_path / 'a.safetensors'}:sql",
                "--onnx-quant",
                "fp32",
                "--gguf-quant",
                "f32",
            ]
        )
        == 0
    )
    reference = _reference_ours(md, adapter, tmp_path)
    for backend in BACKENDS:
        engine = _engine(tmp_path / "b", backend, BACKENDS[backend][0])
        engine.add_adapter("sql")
        prompt = engine.tokenizer_for({"sql": 1.0}).encode("Q3 <sql>")
        assert md.config.vocab_size in prompt
        greedy = engine.generate_ids(prompt, SamplingParams(max_new_tokens=8), adapters={"sql": 1.0})
        assert greedy == _greedy(reference, prompt, 8)[: len(greedy)] and greedy
    assert cli_main(["inspect", str(tmp_path / "b")]) == 0


def test_plain_graph_has_none_of_it_and_the_lora_graph_takes_the_rows(model_dirs, tmp_path):
    """Requests without adapters run model.plain.onnx, which holds no new-token node or input."""
    import onnx

    from converters.onnx_export import export_onnx
    from edge_lora.onnx_format import names

    for family in FAMILIES:
        md = ModelDir(model_dirs[family])
        model = export_onnx(md, tmp_path / family, "fp32", "fast")
        plain = onnx.load(str(model.parent / "model.plain.onnx"), load_external_data=False)
        lora = onnx.load(str(model), load_external_data=False)
        assert not any("added" in n.name or "/lora/" in n.name for n in plain.graph.node)
        assert not any("added" in i.name for i in plain.graph.input)
        inputs = {i.name for i in lora.graph.input}
        assert names.ADDED_EMBED_ROWS in inputs and (names.ADDED_HEAD_ROWS in inputs) == (
            not md.config.tie_word_embeddings
        )
        logits = next(o for o in lora.graph.output if o.name == names.LOGITS)
        assert (
            logits.type.tensor_type.shape.dim[2].dim_param == "vocab_size"
        )  # base + the request's new tokens
        layout = read_layout(model)
        assert (
            layout["version"] >= names.ADDED_ROWS_LAYOUT_VERSION
            and layout["added_rows"]["embed"] == names.ADDED_EMBED_ROWS
        )


@pytest.mark.gpu
@pytest.mark.slow
def test_webgpu_runs_new_tokens_like_the_cpu(model_dirs, tmp_path, webgpu_device):
    """The GPU path feeds one zero row when a set has no new tokens (WebGPU never gets a zero-size
    input): one more logit, never returned or sampled; with new tokens, the CPU's logits and tokens."""
    from factories import build_bundle

    from runtime.onnx.backend import OnnxEngine

    md = ModelDir(model_dirs["llama"])
    root = build_bundle(
        md.path, tmp_path / "b", {"t": _ours(md), "p": random_adapter(md, seed=3, mixed_ranks=1)}
    )
    engines = [OnnxEngine(root, quant="fp32", device=d, plain_session=False) for d in ("gpu", "cpu")]
    for engine in engines:
        engine.add_adapter("t")
        engine.add_adapter("p")
    v, ids = md.config.vocab_size, _prompt(md)
    for chosen, prompt, width in (({"t": 1.0}, ids, v + 2), ({"p": 1.0}, [5, 7, 9], v), ({}, [5, 7, 9], v)):
        gpu, cpu = (e.logits(prompt, adapters=chosen) for e in engines)
        assert gpu.shape == cpu.shape == (len(prompt), width)
        np.testing.assert_allclose(gpu, cpu, atol=1e-4)
        params = SamplingParams(max_new_tokens=5)
        assert engines[0].generate_ids(prompt, params, adapters=chosen) == engines[1].generate_ids(
            prompt, params, adapters=chosen
        )


@pytest.mark.slow
def test_tokens_only_adapter_runs_on_both_backends(model_dirs, tmp_path):
    """An adapter with new tokens and no LoRA tensor: a GGUF LoRA with no tensors (stock llama.cpp
    loads it), the rows fed by the runtime; the same logits as transformers on both backends."""
    md = ModelDir(model_dirs["smollm"])
    adapter = _ours(md)
    adapter.modules = {}
    adapter.save(tmp_path / "t.safetensors")
    options = ExportOptions(backends=["onnx", "gguf"], onnx_quants=["fp32"], gguf_quants=["f32"])
    root = export_bundle(
        md.path,
        tmp_path / "b",
        [AdapterSource(tmp_path / "t.safetensors", "t")],
        options,
        show_progress=False,
    )
    assert "gguf" in describe(root)["adapters"]["t"]["backends"]
    reference = _resized(md)
    import torch

    with torch.no_grad():
        reference.get_input_embeddings().weight[md.config.vocab_size :] = torch.from_numpy(adapter.embed_rows)
    ids = _prompt(md)
    for backend in BACKENDS:
        engine = _engine(root, backend, BACKENDS[backend][0])
        engine.add_adapter("t")
        np.testing.assert_allclose(
            engine.logits(ids, adapters={"t": 1.0}), _ref_logits(reference, ids), atol=2e-4, rtol=0
        )
        with pytest.raises(EdgeLoraError, match="adds tokens or token rows"):
            engine.merge("t")
