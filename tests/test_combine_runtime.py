"""A combined adapter is an adapter like any other: `cat` of {a: 1.0, b: 0.5} added with
`export --add-adapter` gives the stacked set's logits on both backends, runs as one adapter in stock
onnxruntime-genai and as one LoRA GGUF in llama.cpp, and signs and verifies with the bundle."""

from __future__ import annotations

import numpy as np
import pytest
from factories import build_bundle, random_adapter

from edge_lora.app.cli import main
from edge_lora.model_dir import ModelDir
from runtime.sampling import SamplingParams

IDS = [5, 17, 42, 99, 120, 7, 33, 64, 11]
STACK = {"a": 1.0, "b": 0.5}


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    root = tmp_path_factory.mktemp("combine")
    adapters = {
        "a": random_adapter(md, seed=1, rank=4, std=0.3, modules=["q_proj", "v_proj", "down_proj"]),
        "b": random_adapter(md, seed=2, rank=8, alpha=4.0, rslora=True, std=0.3, mixed_ranks=2),
    }
    for name, adapter in adapters.items():
        adapter.save(root / f"{name}.safetensors")
    bundle = build_bundle(md.path, root / "bundle", adapters, backends=("onnx", "gguf"))
    spec = [f"{root / 'a.safetensors'}:1.0", f"{root / 'b.safetensors'}:0.5"]
    args = ["combine", "--adapter", spec[0], "--adapter", spec[1], "--method", "cat"]
    assert main([*args, "--out", str(root / "c.safetensors")]) == 0
    assert main(["export", "--add-adapter", str(bundle), f"{root / 'c.safetensors'}:c"]) == 0
    return md, bundle


@pytest.mark.parametrize("backend, options", [("onnx", {"quant": "fp32"}), ("llamacpp", {"precise": True})])
def test_cat_gives_the_stacks_logits(bundle, backend, options):
    import runtime

    _, root = bundle
    engine = runtime.load(root, backend=backend, **options)
    for name in ("a", "b", "c"):
        engine.add_adapter(name)
    stacked = engine.logits(IDS, adapters=STACK)
    combined = engine.logits(IDS, adapters={"c": 1.0})
    base = engine.logits(IDS, adapters={})
    diff = float(np.abs(stacked - combined).max())
    print(
        f"{backend}: stack vs cat max |logit diff| = {diff:.2e} "
        f"(the stack moves them {np.abs(stacked - base).max():.2f})"
    )
    assert diff < 1e-5 and np.abs(stacked - base).max() > 0.1


def test_runs_as_one_adapter_in_onnxruntime_genai(bundle):
    import runtime

    og = pytest.importorskip("onnxruntime_genai")
    md, root = bundle
    model = og.Model(str(root / "onnx" / "fp32-fast"))
    loaded = og.Adapters(model)
    loaded.load(str(root / "adapters" / "c.onnx_adapter"), "c")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(IDS) + 10, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_active_adapter(loaded, "c")
    generator.append_tokens(IDS)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)[len(IDS) :]]
    eos = set(md.config.eos_token_id)
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in eos), len(theirs))]
    engine = runtime.load(root, backend="onnx", quant="fp32")
    engine.add_adapter("a")
    engine.add_adapter("b")
    ours = engine.generate_ids(IDS, SamplingParams(max_new_tokens=10), adapters=STACK)
    assert theirs == ours and len(ours) >= 4


def test_runs_as_one_lora_gguf_in_llama_cpp(bundle):
    import llama_cpp

    import runtime

    _, root = bundle
    engine = runtime.load(root, backend="llamacpp", precise=True)
    engine.add_adapter("a")
    engine.add_adapter("b")
    ours = engine.logits(IDS, adapters=STACK)
    llm = llama_cpp.Llama(
        model_path=str(root / "gguf/model-f32.gguf"),
        lora_path=str(root / "adapters/c.gguf"),
        logits_all=True,
        n_ctx=64,
        verbose=False,
    )
    llm.eval(IDS)
    theirs = np.array(llm.scores[: len(IDS)])
    assert np.abs(theirs - ours).max() < 1e-3  # llama.cpp's own f16 KV cache


def test_signs_and_verifies_with_the_bundle(bundle, tmp_path):
    pytest.importorskip("cryptography")
    _, root = bundle
    key = tmp_path / "k"
    assert main(["keygen", str(key)]) == 0
    assert main(["sign", "--key", f"{key}.key", str(root / "adapters" / "c.safetensors")]) == 0
    assert main(["verify", "--key", f"{key}.pub", str(root / "adapters" / "c.safetensors")]) == 0
