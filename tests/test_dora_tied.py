"""DoRA adapters and LoRA on a tied output head, made by PEFT, through `edge-lora export` and runtime.load on
both backends, against transformers + PEFT (the reference for DoRA's norm, its stacking order and
set_scale)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.numpy import load_file, save_file
from tiny_models import load_hf, quick_train_config

import runtime
from converters.export import AdapterSource, ExportOptions, add_adapter, export_bundle
from edge_lora.app.describe import describe
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir

BACKENDS = (("onnx", {}), ("llamacpp", {"precise": True}))
TOL = 1e-3  # fp32 logits, as the other adapter tests


def _peft_dir(md_path, out, seed, **config):
    torch.manual_seed(seed)
    model = get_peft_model(load_hf(md_path), LoraConfig(r=4, lora_alpha=8, **config))
    with torch.no_grad():  # B starts at zero and the magnitude at the norm: move both so DoRA means something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(out)  # on a tied lm_head PEFT warns and saves the tied weight too
    return out


@pytest.fixture(scope="module")
def made(model_dirs, tmp_path_factory):
    """SmolLM-shaped (tied) base; PEFT adapters: DoRA on every linear, LoRA on q_proj + lm_head, plain
    LoRA; one bundle with fp32 / f32 and int4 / q4_0 bases."""
    root = tmp_path_factory.mktemp("dora_tied")
    md = ModelDir(model_dirs["smollm"])
    dirs = {
        "dora": _peft_dir(md.path, root / "dora", 1, target_modules="all-linear", use_dora=True),
        "head": _peft_dir(md.path, root / "head", 2, target_modules=["q_proj", "lm_head"]),
        "plain": _peft_dir(md.path, root / "plain", 3, target_modules=["q_proj", "v_proj", "down_proj"]),
        "dora_head": _peft_dir(
            md.path, root / "dora_head", 4, target_modules=["v_proj", "lm_head"], use_dora=True
        ),
    }
    options = ExportOptions(onnx_quants=["fp32", "int4"], gguf_quants=["f32", "q4_0"])
    bundle = export_bundle(
        md.path, root / "bundle", [AdapterSource(p, n) for n, p in dirs.items()], options, show_progress=False
    )
    return md, dirs, bundle


def _peft(md, dirs, active: list[str], scales: dict[str, float] | None = None):
    model = PeftModel.from_pretrained(load_hf(md.path), dirs[active[0]], adapter_name=active[0])
    for name in active[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    model.base_model.set_adapter(active)
    for name, scale in (scales or {}).items():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(name, scale)
    return model.eval()


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _ids(md, n=12, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, md.config.vocab_size, n)]


def test_export_accepts_them_and_says_what_llama_cpp_gets(made):
    md, _, bundle = made
    entries = json.loads((bundle / "bundle.json").read_text())["adapters"]
    for name in ("dora", "head", "dora_head"):
        assert entries[name]["onnx"] and not any(k.endswith("_skipped") for k in entries[name]), entries[name]
        assert "merged into a variant" in entries[name]["gguf_merged"]
    assert entries["plain"]["gguf"] and "gguf_merged" not in entries["plain"]
    assert entries["dora"]["dora"] and "DoRA" in entries["dora"]["gguf_merged"]
    shown = describe(bundle)["adapters"]
    assert (
        "tied output head" in shown["head"]["gguf_merged_variant"]
        and "gguf_merged_variant" not in shown["plain"]
    )


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_fp32_logits_match_peft(made, backend, options):
    md, dirs, bundle = made
    ids = _ids(md)
    engine = runtime.load(bundle, backend=backend, quant="fp32" if backend == "onnx" else "f32", **options)
    base = engine.logits(ids, adapters={})
    for name in ("dora", "head", "dora_head"):  # dora_head: DoRA on the tied head (per vocabulary row)
        engine.add_adapter(name)
        want = _logits(_peft(md, dirs, [name]), ids)
        got = engine.logits(ids, adapters={name: 1.0})
        print(
            f"{backend} {name}: max |diff| {np.abs(got - want).max():.2e}, "
            f"moved {np.abs(want - base).max():.2f}"
        )
        assert np.abs(got - want).max() < TOL and np.abs(want - base).max() > 0.1
    if backend == "llamacpp":
        variants = engine.info()["merged_variants"]
        assert set(variants) == {"dora", "head", "dora_head"} and all(
            v["add_seconds"] > 0 for v in variants.values()
        )


def test_onnx_dora_stacks_and_scales_as_peft(made):
    """PEFT's DoRA rescales what the adapters active before it added, so order matters: the runtime
    keeps the caller's order; a user scale scales DoRA's delta inside the norm too (set_scale)."""
    md, dirs, bundle = made
    ids = _ids(md, seed=1)
    engine = runtime.load(bundle, backend="onnx", quant="fp32")
    for name in ("dora", "plain", "head"):
        engine.add_adapter(name)
    for active, scales in (
        (["plain", "dora"], {}),
        (["dora", "plain"], {}),
        (["dora"], {"dora": 0.5}),
        (["head", "dora", "plain"], {"plain": -0.7, "dora": 1.3}),
    ):
        want = _logits(_peft(md, dirs, active, scales), ids)
        got = engine.logits(ids, adapters={n: scales.get(n, 1.0) for n in active})
        print(f"{active} {scales}: max |diff| {np.abs(got - want).max():.2e}")
        assert np.abs(got - want).max() < TOL
    first = engine.logits(ids, adapters={"plain": 1.0, "dora": 1.0})
    assert (
        np.abs(first - engine.logits(ids, adapters={"dora": 1.0, "plain": 1.0})).max() > 1e-3
    )  # order counts


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_swap_lora_dora_none_equals_fresh_engines(made, backend, options):
    md, _, bundle = made
    ids = _ids(md, seed=2)
    quant = "fp32" if backend == "onnx" else "f32"
    engine = runtime.load(bundle, backend=backend, quant=quant, **options)
    for name in ("plain", "dora", "head"):
        engine.add_adapter(name)
    sequence = [{"plain": 1.0}, {"dora": 1.0}, {}, {"head": 1.0}, {"dora": 1.0}, {"plain": 1.0}]
    got = [
        (engine.generate_ids(ids, _greedy(8), adapters=s), engine.logits(ids, adapters=s)) for s in sequence
    ]
    for chosen, (tokens, logits) in zip(sequence, got):
        fresh = runtime.load(bundle, backend=backend, quant=quant, **options)
        for name in chosen:
            fresh.add_adapter(name)
        assert tokens == fresh.generate_ids(ids, _greedy(8), adapters=chosen), chosen
        assert np.abs(logits - fresh.logits(ids, adapters=chosen)).max() < 1e-4, chosen


@pytest.mark.parametrize("backend,quant", [("onnx", "int4"), ("llamacpp", "q4_0")])
def test_4_bit_greedy_agrees_with_peft(made, backend, quant):
    """Top-1 agreement at the bar the plain 4-bit tests use (tiny random models have flat logits), and the
    adapter's own change of the logits reproduced (correlation with PEFT's change)."""
    md, dirs, bundle = made
    engine = runtime.load(bundle, backend=backend, quant=quant)
    base_model = load_hf(md.path)
    for name in ("dora", "head", "dora_head"):
        engine.add_adapter(name)
        model = _peft(md, dirs, [name])
        agree = total = 0
        moved, want_moved = [], []
        for seed in range(4):
            ids = _ids(md, n=12, seed=10 + seed)
            want, got = _logits(model, ids), engine.logits(ids, adapters={name: 1.0})
            agree, total = agree + int((want.argmax(-1) == got.argmax(-1)).sum()), total + len(ids)
            moved.append(got - engine.logits(ids, adapters={}))
            want_moved.append(want - _logits(base_model, ids))
        corr = np.corrcoef(np.concatenate(moved).ravel(), np.concatenate(want_moved).ravel())[0, 1]
        print(
            f"{backend} {quant} {name}: greedy agreement {agree}/{total}, "
            f"adapter effect correlation {corr:.3f}"
        )
        assert agree / total >= 0.6 and corr > 0.9


def test_llamacpp_merged_variant_runs_alone_at_scale_one(made):
    _, _, bundle = made
    engine = runtime.load(bundle, backend="llamacpp", quant="f32", precise=True)
    engine.add_adapter("dora")
    engine.add_adapter("plain")
    with pytest.raises(EdgeLoraError, match="merged variant.*alone and at scale 1.0"):
        engine.logits([1, 2, 3], adapters={"dora": 1.0, "plain": 1.0})
    engine.remove_adapter("dora")
    assert engine.info()["merged_variants"] == {}
    engine.logits([1, 2, 3], adapters={"plain": 1.0})


def test_peft_tied_head_weight_checked_against_the_base(made, tmp_path):
    """PEFT's lm_head.base_layer.weight is dropped when it is the base's table (checked against the
    model dir, or the bundle's quantized copy on --add-adapter), refused when the head was trained."""
    md, dirs, bundle = made
    copy = shutil.copytree(bundle, tmp_path / "b")
    int4_only = tmp_path / "int4"
    export_bundle(
        md.path, int4_only, [], ExportOptions(backends=["onnx"], onnx_quants=["int4"]), show_progress=False
    )
    for target in (copy, int4_only):
        entry = add_adapter(target, AdapterSource(dirs["head"], "head2"), show_progress=False)
        assert entry["onnx"] and "head2" in json.loads((target / "bundle.json").read_text())["adapters"]
    trained = shutil.copytree(dirs["head"], tmp_path / "trained")
    tensors = load_file(trained / "adapter_model.safetensors")
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, trained / "adapter_model.safetensors")
    with pytest.raises(
        EdgeLoraError, match="differs from the base's tied embedding.*merge_and_unload"
    ) as err:
        add_adapter(int4_only, AdapterSource(trained, "trained"), show_progress=False)
    assert "\n" not in str(err.value) and "adapter_model.safetensors" in str(err.value)
    with pytest.raises(EdgeLoraError, match="differs"):
        export_bundle(
            md.path,
            tmp_path / "new",
            [AdapterSource(trained, "t")],
            ExportOptions(backends=["onnx"]),
            show_progress=False,
        )


def _greedy(n):
    from runtime.sampling import SamplingParams

    return SamplingParams.from_kwargs(max_new_tokens=n, temperature=0.0)


def test_onnxruntime_genai_runs_the_dora_and_tied_head_files(made):
    """The bundle's .onnx_adapter files (dora_scale, tied lm_head slot) in onnxruntime-genai give our
    greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    from runtime.sampling import SamplingParams

    md, _, bundle = made
    engine = runtime.load(bundle, backend="onnx", quant="fp32")
    model = og.Model(str(bundle / "onnx" / "fp32-fast"))
    files = og.Adapters(model)
    ids, new, eos = _ids(md, n=7, seed=5), 10, set(md.config.eos_token_id)
    for name in ("dora", "head"):
        engine.add_adapter(name)
        files.load(str(bundle / "adapters" / f"{name}.onnx_adapter"), name)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, do_sample=False)
        generator = og.Generator(model, params)
        generator.set_active_adapter(files, name)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        theirs = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        theirs = theirs[: next((i for i, t in enumerate(theirs) if t in eos), len(theirs))]
        ours = engine.generate_ids(ids, SamplingParams(max_new_tokens=new), adapters={name: 1.0})
        assert (
            ours == theirs and len(ours) >= 4
        )  # (that the adapters move the logits: test_fp32_logits_match_peft)


def test_our_trainers_dora_runs_on_both_backends(model_dirs, tmp_path):
    """`edge-lora train --dora` (rsLoRA too) -> export -> both backends give our PyTorch model's logits."""
    from edge_lora.adapter import Adapter
    from edge_lora.train.lora import load_adapter_into
    from edge_lora.train.model import CausalLM
    from edge_lora.train.trainer import train

    md = ModelDir(model_dirs["llama"])
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"select name from users where id = {i} and the fox jumps"}) + "\n"
            for i in range(8)
        )
    )
    out = tmp_path / "dora.safetensors"
    train(
        quick_train_config(
            tmp_path, md.path, data, out=str(out), lr=5e-2, dora=True, rslora=True, eval_split=0
        )
    )
    adapter = Adapter.load(out)
    assert adapter.dora
    bundle = export_bundle(
        md.path,
        tmp_path / "b",
        [AdapterSource(out, "ours")],
        ExportOptions(onnx_quants=["fp32"], gguf_quants=["f32"]),
        show_progress=False,
    )
    model = CausalLM.from_model_dir(md.path).eval()
    load_adapter_into(model, adapter)
    ids = _ids(md, seed=7)
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    for backend, options in BACKENDS:
        engine = runtime.load(bundle, backend=backend, **options)
        engine.add_adapter("ours")
        assert np.abs(engine.logits(ids, adapters={"ours": 1.0}) - want).max() < TOL, backend


@pytest.mark.parametrize("backend,options", BACKENDS)
def test_dora_after_a_merge_uses_the_merged_weights(made, backend, options):
    """engine.merge(plain) then DoRA unmerged = PEFT's DoRA on the base with plain merged in
    (merge_and_unload: DoRA's norm is of the weight the layer holds)."""
    md, dirs, bundle = made
    ids = _ids(md, seed=3)
    engine = runtime.load(bundle, backend=backend, quant="fp32" if backend == "onnx" else "f32", **options)
    engine.add_adapter("plain")
    engine.add_adapter("dora")
    before = engine.logits(ids, adapters={"dora": 1.0})
    engine.merge("plain")
    merged_base = _peft(md, dirs, ["plain"]).merge_and_unload()
    want = _logits(PeftModel.from_pretrained(merged_base, dirs["dora"]).eval(), ids)
    got = engine.logits(ids, adapters={"dora": 1.0})
    assert np.abs(got - want).max() < TOL and np.abs(got - before).max() > 1e-2
