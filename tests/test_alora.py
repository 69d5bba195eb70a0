"""Activated adapters (aLoRA) made by PEFT (``alora_invocation_tokens``): imported, exported, and run on
both backends against transformers + PEFT, with the prompt before the invocation evaluated once for every
activated adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import load_hf

import runtime
from converters.export import AdapterSource, ExportOptions, export_bundle
from converters.peft import export_peft, import_peft
from edge_lora.adapter import Adapter
from edge_lora.app.describe import describe
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from runtime.activation import activation_plan, last_occurrence
from runtime.sampling import SamplingParams

BACKENDS = (("onnx", {"quant": "fp32"}), ("llamacpp", {"quant": "f32", "precise": True}))
TOL = 1e-3  # fp32 logits, as the other adapter tests
INVOKE_X = [11, 12, 13]
INVOKE_Y = [21, 22]


def _peft_dir(md_path, out, seed, **config):
    torch.manual_seed(seed)
    model = get_peft_model(load_hf(md_path), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **config))
    with torch.no_grad():  # B starts at zero: move it so the adapter means something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def made(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("alora")
    md = ModelDir(model_dirs["llama"])
    dirs = {
        "x": _peft_dir(md.path, root / "x", 1, target_modules="all-linear", alora_invocation_tokens=INVOKE_X),
        "y": _peft_dir(
            md.path, root / "y", 2, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=INVOKE_Y
        ),
        "plain": _peft_dir(md.path, root / "plain", 3, target_modules=["q_proj", "down_proj"]),
    }
    options = ExportOptions(onnx_quants=["fp32"], gguf_quants=["f32"])
    bundle = export_bundle(
        md.path, root / "bundle", [AdapterSource(p, n) for n, p in dirs.items()], options, show_progress=False
    )
    return md, dirs, bundle


def _peft_logits(md, folder, ids) -> np.ndarray:
    model = PeftModel.from_pretrained(load_hf(md.path), folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _base_logits(md, ids) -> np.ndarray:
    with torch.no_grad():
        return load_hf(md.path)(torch.tensor([ids])).logits[0].numpy()


def _prompt(seed: int, n: int, *tails: list[int]) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in rng.integers(30, 300, n)]  # no invocation token by chance
    for tail in tails:
        ids += tail + [int(t) for t in rng.integers(30, 300, 3)]
    return ids


def test_the_plan_follows_peft():
    assert last_occurrence([1, 2, 3, 1, 2, 9], [1, 2]) == 3
    assert last_occurrence([1, 2, 3], [2, 4]) is None and last_occurrence([1], [1, 2]) is None
    x = Adapter(modules={}, base_architecture="t", invocation_tokens=[7, 8])
    plain = Adapter(modules={}, base_architecture="t")
    adapters = {"x": x, "plain": plain}
    plan = activation_plan([1, 7, 8, 2, 7, 8, 3], {"x": 1.0, "plain": 0.5}, adapters)
    assert [(s.start, s.end, s.adapters) for s in plan] == [
        (0, 4, {"plain": 0.5}),
        (4, 7, {"x": 1.0, "plain": 0.5}),
    ]
    # no invocation: the activated adapter acts nowhere, the request is one segment
    assert [(s.start, s.end, s.adapters) for s in activation_plan([1, 2, 3], {"x": 1.0}, adapters)] == [
        (0, 3, {})
    ]


def test_import_and_export_carry_the_invocation(made, tmp_path):
    md, dirs, bundle = made
    adapter = import_peft(dirs["x"], base=md.config)
    assert adapter.invocation_tokens == INVOKE_X and adapter.activated
    path = tmp_path / "x.safetensors"
    adapter.save(path)
    assert Adapter.load(path).invocation_tokens == INVOKE_X
    assert describe(path)["activated_by"] == INVOKE_X  # edge-lora inspect says so
    gguf = next((bundle / "adapters").glob("x*.gguf"))
    assert describe(gguf)["activated_by"] == INVOKE_X  # the key llama.cpp reads
    again = export_peft(Adapter.load(path), tmp_path / "peft")
    assert json.loads((again / "adapter_config.json").read_text())["alora_invocation_tokens"] == INVOKE_X
    ids = _prompt(0, 10, INVOKE_X)
    np.testing.assert_allclose(_peft_logits(md, again, ids), _peft_logits(md, dirs["x"], ids), atol=1e-5)
    entries = json.loads((bundle / "bundle.json").read_text())["adapters"]
    assert entries["x"]["gguf"] and entries["x"]["onnx"]


def test_bad_invocations_are_refused(made, tmp_path):
    md, dirs, _ = made
    cfg = json.loads((dirs["x"] / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((dirs["x"] / "adapter_model.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "alora_invocation_tokens": "hi"}))
    with pytest.raises(EdgeLoraError, match="alora_invocation_tokens must be a non-empty list"):
        import_peft(bad, base=md.config)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "alora_invocation_tokens": [10**6]}))
    with pytest.raises(EdgeLoraError, match="past the base vocabulary"):
        import_peft(bad, base=md.config)
    adapter = import_peft(dirs["x"], base=md.config)
    for module in adapter.modules.values():
        module.magnitude = np.ones(module.b.shape[0], np.float32)
    adapter.save(tmp_path / "dora.safetensors")
    with pytest.raises(EdgeLoraError, match="cannot be DoRA"):
        Adapter.load(tmp_path / "dora.safetensors")


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_logits_match_peft(made, backend, options):
    md, dirs, bundle = made
    engine = runtime.load(bundle, backend=backend, **options)
    for name in ("x", "y"):
        engine.add_adapter(name)
    invoke = {"x": INVOKE_X, "y": INVOKE_Y}
    for name in ("x", "y"):
        ids = _prompt(1, 9, invoke[name], invoke[name])  # twice: the last occurrence counts
        want = _peft_logits(md, dirs[name], ids)
        got = engine.logits(ids, adapters={name: 1.0})
        start = last_occurrence(ids, invoke[name])
        base = _base_logits(md, ids)
        print(f"{backend} {name}: max |diff| {np.abs(got - want).max():.2e}")
        assert np.abs(got - want).max() < TOL
        assert np.abs(want[start:] - base[start:]).max() > 0.1  # the adapter acts from the invocation on
        np.testing.assert_allclose(got[:start], base[:start], atol=TOL)  # and not before it
        plain = _prompt(2, 12)  # no invocation: the base everywhere, as PEFT
        unmoved = engine.logits(plain, adapters={name: 1.0})
        np.testing.assert_allclose(unmoved, _base_logits(md, plain), atol=TOL)


# the Python binding's bound state too: its segments hand over their KV buffers and leave prefixes
@pytest.mark.parametrize("backend,options", [*BACKENDS, ("onnx", {"quant": "fp32", "session_api": "python"})])
def test_generation_matches_peft_and_fresh_engines(made, backend, options):
    """Greedy requests taking turns between activated adapters, stacked with a plain one, on one system
    prompt: the tokens of a fresh engine per request, and PEFT's first token."""
    md, dirs, bundle = made
    engine = runtime.load(bundle, backend=backend, **options)
    for name in ("x", "y", "plain"):
        engine.add_adapter(name)
    system = _prompt(3, 120)
    turns = [
        ({"x": 1.0}, system + [40, 41] + INVOKE_X),
        ({"y": 1.0}, system + [40, 41] + INVOKE_Y),
        ({}, system + [42]),
        ({"x": 1.0, "plain": 0.5}, system + [43] + INVOKE_X + [44]),
        ({"x": 1.0, "y": 1.0}, system + INVOKE_Y + [45] + INVOKE_X),
        ({"y": 1.0}, system + [40, 41] + INVOKE_Y + [46]),
    ]
    greedy = SamplingParams(max_new_tokens=5)
    for adapters, prompt in turns:
        fresh = runtime.load(bundle, backend=backend, prefix_cache_bytes=0, **options)
        for name in adapters:
            fresh.add_adapter(name)
        got = engine.generate_ids(prompt, greedy, adapters=adapters)
        assert got == fresh.generate_ids(prompt, greedy, adapters=adapters), adapters
        np.testing.assert_allclose(
            engine.logits(prompt, adapters=adapters), fresh.logits(prompt, adapters=adapters), atol=1e-4
        )
        if list(adapters) in (["x"], ["y"]):
            want = _peft_logits(md, dirs[next(iter(adapters))], prompt)[-1]
            assert got[:1] == [int(np.argmax(want))] or np.sort(want)[-2] > np.max(want) - 1e-3


def test_llamacpp_reuses_the_base_prefix_across_activated_adapters(made):
    """x, then y, on one system prompt: y's request evaluates only what follows the shared prefix."""
    _, _, bundle = made
    engine = runtime.load(bundle, backend="llamacpp", quant="f32", precise=True)
    for name in ("x", "y"):
        engine.add_adapter(name)
    system = _prompt(4, 150)
    greedy = SamplingParams(max_new_tokens=3)
    engine.generate_ids(system + INVOKE_X, greedy, adapters={"x": 1.0})
    before = engine.info()["evaluated_positions"]
    out = engine.generate_ids(system + INVOKE_Y, greedy, adapters={"y": 1.0})
    # the invocation and the generated tokens, nothing of the system prompt
    assert engine.info()["evaluated_positions"] - before == len(INVOKE_Y) + len(out)
    # the stock llama.cpp loader reads the invocation from our GGUF (adapter.alora.invocation_tokens)
    from runtime.llamacpp.lib import llama_cpp

    lib, ptr = llama_cpp(), engine._adapters["x"].handle.ptr
    n = lib.llama_adapter_get_alora_n_invocation_tokens(ptr)
    tokens = lib.llama_adapter_get_alora_invocation_tokens(ptr)
    assert [tokens[i] for i in range(n)] == INVOKE_X
    with pytest.raises(EdgeLoraError, match="activated adapter"):
        engine.merge("x")
    engine.close()


def test_onnx_reuses_the_base_prefix_across_activated_adapters(made):
    _, _, bundle = made
    engine = runtime.load(bundle, backend="onnx", quant="fp32")
    for name in ("x", "y"):
        engine.add_adapter(name)
    system = _prompt(5, 150)
    greedy = SamplingParams(max_new_tokens=3)
    engine.generate_ids(system + INVOKE_X, greedy, adapters={"x": 1.0})
    engine.generate_ids(system + INVOKE_Y, greedy, adapters={"y": 1.0})
    stats = engine.info()["prefix_cache"]
    # the second request's base segment (the system prompt) came from the first one's
    assert stats["hits"] == 1 and stats["tokens_reused"] == len(system), stats


def test_combine_keeps_one_invocation(made):
    from edge_lora.combine import CombineConfig, Source, combine_adapters

    md, dirs, _ = made
    x, y = import_peft(dirs["x"], base=md.config), import_peft(dirs["y"], base=md.config)
    halves = combine_adapters([Source("x", x, 0.5), Source("x2", x, 0.5)], CombineConfig("cat"))
    assert halves.invocation_tokens == INVOKE_X
    with pytest.raises(EdgeLoraError, match="same invocation tokens"):
        combine_adapters([Source("x", x, 1.0), Source("y", y, 1.0)], CombineConfig("cat"))
