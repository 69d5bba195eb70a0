"""Adapters on the ONNX Runtime backend: swap, per-request sets, stacking, DoRA, .onnx_adapter files,
onnxruntime-genai on the same folder, execution providers, and the errors users can hit."""

import shutil
import threading

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from gpu_env import child_env
from onnx_helpers import torch_logits

from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from runtime.onnx.backend import OnnxEngine
from runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def setup(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    adapters = {
        "a": random_adapter(md, seed=1, mixed_ranks=1),
        "b": random_adapter(md, seed=2, rank=2, mixed_ranks=1),
        "d": random_adapter(md, seed=3, dora=True, b_std=0.05, mixed_ranks=1),
    }
    root = build_bundle(
        md.path, tmp_path_factory.mktemp("adapters") / "b", adapters, onnx_quants=("fp32", "int4")
    )
    return md, adapters, root


def ids_for(md, n=20, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, md.config.vocab_size, n)]


def test_lora_session_opens_only_once_an_adapter_is_added(setup):
    md, adapters, root = setup
    engine = OnnxEngine(root, quant="int4", plain_session=True)
    ids = ids_for(md)
    base = engine.logits(ids)
    assert not engine.sessions.lora_started  # base-only use opens one graph
    engine.add_adapter("a")
    assert engine.sessions.lora_started  # loading in the background while the caller goes on
    np.testing.assert_allclose(engine.logits(ids, adapters={}), base, atol=1e-6)
    assert np.abs(engine.logits(ids, adapters={"a": 1.0}) - base).max() > 1e-2


def test_cpu_engine_keeps_both_graphs_over_one_copy_of_the_weights(setup):
    """The C API path: base-only requests stay on the plain graph after adapters are added, and both
    sessions share the mapped weights and one prepacked-weights container; merged weights replace
    the shared tensors in both. The Python binding (one copy per session) holds one at a time."""
    md, adapters, root = setup
    engine = OnnxEngine(root, quant="int4")
    assert engine.info()["session_api"] == "c"
    ids = ids_for(md, seed=3)
    base = engine.logits(ids)
    greedy = SamplingParams(max_new_tokens=8)
    before = engine.generate_ids(ids[:6], greedy, adapters={})
    engine.add_adapter("a")
    plain, lora = engine.sessions.plain, engine.sessions.lora
    assert plain is not None and engine.info()["plain_session"]
    assert plain.container is lora.container and plain.overrides.keys() == lora.overrides.keys()
    assert all(plain.overrides[n] is lora.overrides[n] for n in plain.overrides)  # the same tensors
    assert engine.adapter_sets.choice({}, {}).session is plain
    np.testing.assert_allclose(engine.logits(ids), base, atol=1e-6)
    assert engine.generate_ids(ids[:6], greedy, adapters={}) == before
    python = OnnxEngine(root, quant="int4", session_api="python")
    python.add_adapter("a")
    assert python.plain_session is None and python.info()["session_api"] == "python"
    with_a = python.logits(ids, adapters={"a": 1.0})
    np.testing.assert_allclose(engine.logits(ids, adapters={"a": 1.0}), with_a, atol=1e-5)
    np.testing.assert_allclose(python.logits(ids), base, atol=1e-5)
    engine.merge("a")
    merged = engine.logits(ids)
    assert engine.sessions.plain is not None and engine.sessions.plain is not plain
    assert np.abs(merged - base).max() > 1e-3  # int4 rounds much of it away; fp32 merges: test_stacked_...
    lora_only = OnnxEngine(root, quant="int4", plain_session=False)
    assert lora_only.plain_session is None
    np.testing.assert_allclose(lora_only.logits(ids), base, atol=1e-5)


def test_swap_a_b_a_none_equals_fresh_sessions(setup):
    md, adapters, root = setup
    engine = OnnxEngine(root, quant="int4")
    engine.add_adapter("a")
    engine.add_adapter("b")
    sessions = (engine.lora_session, engine.plain_session)
    ids = ids_for(md)
    sequence = [{"a": 1.0}, {"b": 1.0}, {"a": 1.0}, {}]
    swapped = [engine.logits(ids, adapters=s) for s in sequence]
    assert (engine.lora_session, engine.plain_session) == sessions  # no session was reopened
    for chosen, got in zip(sequence, swapped):
        fresh = OnnxEngine(root, quant="int4")
        for name in chosen:
            fresh.add_adapter(name)
        np.testing.assert_allclose(got, fresh.logits(ids, adapters=chosen), atol=1e-6)
    assert np.abs(swapped[0] - swapped[1]).max() > 1e-2  # the adapters really differ


def test_stacked_equals_merged_sum(setup):
    md, adapters, root = setup
    ids = ids_for(md)
    want = torch_logits(md.path, ids, [(adapters["a"], 1.0), (adapters["b"], 0.5)])
    engine = OnnxEngine(root, quant="fp32")
    engine.add_adapter("a")
    engine.add_adapter("b")
    stacked = engine.logits(ids, adapters={"a": 1.0, "b": 0.5})
    engine.merge("a", 1.0)
    engine.merge("b", 0.5)
    merged = engine.logits(ids, adapters={})
    print(
        f"stacked vs PyTorch merged sum {np.abs(stacked - want).max():.2e}, "
        f"stacked vs merged {np.abs(stacked - merged).max():.2e}"
    )
    assert np.abs(stacked - want).max() < 1e-3 and np.abs(stacked - merged).max() < 1e-4


def test_per_request_set_leaves_default_and_other_threads_alone(setup):
    md, _, root = setup
    engine = OnnxEngine(root, quant="fp32")
    engine.add_adapter("a")
    engine.add_adapter("b")
    engine.set_adapters({"a": 1.0})
    ids = ids_for(md, 8)
    params = SamplingParams(max_new_tokens=12)
    expected = {
        key: engine.generate_ids(ids, params, adapters=dict(key))
        for key in ((("a", 1.0),), (("b", 1.0),), ())
    }
    assert engine.generate_ids(ids, params) == expected[(("a", 1.0),)]  # the default set
    results, errors = {}, []

    def worker(i, key):
        try:
            results[i] = (key, engine.generate_ids(ids, params, adapters=dict(key)))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i, key)) for i, key in enumerate(list(expected) * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(tokens == expected[key] for key, tokens in results.values())
    assert len({tuple(v) for v in expected.values()}) == 3


def test_dora_runs_unmerged_and_merges(setup):
    md, adapters, root = setup
    engine = OnnxEngine(root, quant="fp32")
    engine.add_adapter("d")
    ids = ids_for(md)
    want = torch_logits(md.path, ids, [(adapters["d"], 1.0)])
    assert np.abs(engine.logits(ids, adapters={"d": 1.0}) - want).max() < 1e-3
    engine.merge("d")
    assert (
        np.abs(engine.logits(ids, adapters={}) - torch_logits(md.path, ids, [(adapters["d"], 1.0)])).max()
        < 1e-3
    )


def test_onnx_adapter_file_equals_feeds_built_from_safetensors(setup):
    """The bundle's .onnx_adapter (ORT LoraAdapter, run options) and the feeds the engine builds from the
    checked .safetensors (it never opens the .onnx_adapter) hold the same tensors and give one model."""
    import onnxruntime as ort

    md, _, root = setup
    engine = OnnxEngine(root, quant="int4")
    engine.add_adapter("a")  # from the bundle
    engine.add_adapter("a_file", root / "adapters" / "a.safetensors")  # a loose file
    exported = ort.AdapterFormat.read_adapter(str(root / "adapters" / "a.onnx_adapter")).get_parameters()
    for name in ("a", "a_file"):
        ours = engine.adapter_sets.cache[((name, 1.0),)]["arrays"]  # stacked when added
        assert set(ours) <= set(exported)
        for key, value in exported.items():  # the groups the adapter leaves out: rank-1 zeros (WebGPU)
            want = (
                ours[key]
                if key in ours
                else np.zeros([1 if d == 0 else d for d in value.numpy().shape], np.float32)
            )
            assert key in ours or 1 in value.numpy().shape
            np.testing.assert_array_equal(value.numpy(), want)
    ids = ids_for(md)
    via_file = engine.logits(ids, adapters={"a_file": 1.0})
    assert np.abs(engine.logits(ids, adapters={"a": 1.0}) - via_file).max() < 1e-5
    lora = ort.LoraAdapter()  # and ONNX Runtime alone, on the raw session
    lora.Load(str(root / "adapters" / "a.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    c = md.config
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(c.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (1, c.num_key_value_heads, 0, c.head_dim), np.float32
            )
    raw = ort.InferenceSession(str(engine.model_path), providers=["CPUExecutionProvider"])
    theirs = raw.run(["logits"], feeds, run_options=options)[0][0]
    assert np.abs(via_file - theirs).max() < 1e-5


@pytest.mark.parametrize("quant", ["int4", "fp32"])
def test_onnxruntime_genai_loads_folder_and_matches_greedy(setup, quant):
    md, _, root = setup
    _genai_matches_ours(md, root, quant)


def test_onnxruntime_genai_on_tied_quantized_table(model_dirs, tmp_path):
    """Qwen2 (tied, q/k/v bias) int4: the embedding gathers from the head's int4 weight."""
    md = ModelDir(model_dirs["qwen2"])
    root = build_bundle(
        md.path, tmp_path / "b", {"a": random_adapter(md, seed=5, mixed_ranks=1)}, onnx_quants=("int4",)
    )
    _genai_matches_ours(md, root, "int4")


def _genai_matches_ours(md, root, quant):
    og = pytest.importorskip("onnxruntime_genai")
    engine = OnnxEngine(root, quant=quant)
    engine.add_adapter("a")
    model = og.Model(str(root / "onnx" / f"{quant}-fast"))
    loaded = og.Adapters(model)
    loaded.load(str(root / "adapters" / "a.onnx_adapter"), "a")
    ids, new = ids_for(md, 7), 12
    eos = set(md.config.eos_token_id)
    outputs = []
    for name in (None, "a"):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, do_sample=False)
        generator = og.Generator(model, params)
        if name:
            generator.set_active_adapter(loaded, name)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        theirs = [int(t) for t in generator.get_sequence(0)[len(ids) :]]
        theirs = theirs[: next((i for i, t in enumerate(theirs) if t in eos), len(theirs))]
        ours = engine.generate_ids(
            ids, SamplingParams(max_new_tokens=new), adapters={name: 1.0} if name else {}
        )
        print(f"genai {md.config.model_type} {quant} adapter={name}: {theirs} ours {ours}")
        assert ours == theirs and len(ours) >= 4
        outputs.append(ours)
    assert outputs[0] != outputs[1]  # the adapter changed the generation


def test_unavailable_provider_warns_and_falls_back_to_cpu(setup):
    md, _, root = setup
    with pytest.warns(RuntimeWarning, match="coreml.*falling back to CPU"):
        engine = OnnxEngine(root, quant="fp32", provider="coreml")
    assert engine.providers == ["CPUExecutionProvider"] and engine.info()["providers"] == [
        "CPUExecutionProvider"
    ]
    assert engine.logits(ids_for(md, 4)).shape == (4, md.config.vocab_size)
    with pytest.raises(EdgeLoraError, match="unknown execution provider"):
        OnnxEngine(root, quant="fp32", provider="tpu")


def test_generation_controls_on_onnx(setup):
    md, _, root = setup
    engine = OnnxEngine(root, quant="fp32")
    engine.add_adapter("a")
    streamed = "".join(
        engine.generate(
            "SELECT name", 16, adapters={"a": 1.0}, stream=True, temperature=0.8, top_k=20, seed=7
        )
    )
    assert streamed == engine.generate(
        "SELECT name", 16, adapters={"a": 1.0}, temperature=0.8, top_k=20, seed=7
    )
    full = engine.generate("SELECT name", 16, repetition_penalty=1.3)
    if len(full) > 3:
        stop = full[2:4]
        assert (
            engine.generate("SELECT name", 16, repetition_penalty=1.3, stop=[stop]) == full[: full.find(stop)]
        )


def test_layout_2_bundle_still_loads_and_refuses_tied_head_and_dora(model_dirs, tmp_path):
    """A bundle from before layout version 3 (no tied lm_head slot, no DoRA input) keeps running plain
    LoRA."""
    import json

    md = ModelDir(model_dirs["smollm"])
    root = build_bundle(md.path, tmp_path / "b")
    layout_path = root / "onnx" / "fp32-fast" / "onnx_layout.json"
    layout = json.loads(layout_path.read_text())
    layout["version"] = 2
    del layout["dora"], layout["lora_slots"]["lm_head"]
    layout_path.write_text(json.dumps(layout))
    head = random_adapter(md, seed=1, modules=["lm_head"], mixed_ranks=1)
    head.save(tmp_path / "head.safetensors")
    random_adapter(md, seed=2, dora=True, modules=["model.layers.0.mlp.up_proj"], mixed_ranks=1).save(
        tmp_path / "dora.safetensors"
    )
    random_adapter(md, seed=3, modules=["model.layers.0.mlp.up_proj"], mixed_ranks=1).save(
        tmp_path / "plain.safetensors"
    )
    engine = OnnxEngine(root, verify_hashes=False)
    with pytest.raises(EdgeLoraError, match="lm_head.*re-export"):
        engine.add_adapter("head", tmp_path / "head.safetensors")
    with pytest.raises(EdgeLoraError, match="layout version 3"):
        engine.add_adapter("dora", tmp_path / "dora.safetensors")
    engine.add_adapter("plain", tmp_path / "plain.safetensors")
    assert engine.logits([1, 2, 3], adapters={"plain": 1.0}).shape == (3, md.config.vocab_size)


def test_tampered_or_corrupt_model_is_a_user_error(setup, tmp_path):
    _, _, root = setup
    copy = shutil.copytree(root, tmp_path / "b")
    data = copy / "onnx" / "fp32-fast" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(EdgeLoraError, match="SHA-256"):
        OnnxEngine(copy, quant="fp32")
    (copy / "onnx" / "fp32-fast" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgeLoraError, match="cannot load"):
        OnnxEngine(copy, quant="fp32", verify_hashes=False, plain_session=False)
    (copy / "onnx" / "fp32-fast" / "model.plain.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgeLoraError, match="cannot load"):
        OnnxEngine(copy, quant="fp32", verify_hashes=False)


def test_runtime_needs_neither_torch_nor_onnx_nor_converters(setup):
    import subprocess
    import sys

    _, _, root = setup
    code = (
        "import sys, runtime\n"
        f"e = runtime.load({str(root)!r}, backend='onnx', quant='int4')\n"
        "e.add_adapter('a'); e.add_adapter('b')\n"
        "e.generate('SELECT', 4, adapters={'a': 1.0, 'b': 0.5}); e.merge('a')\n"
        "bad = [m for m in ('torch', 'onnx', 'converters', 'edge_lora.train') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]),
        env=child_env(),
    )


def test_merge_while_another_thread_generates(setup):
    """A request running on the old sessions finishes unharmed while a merge swaps the sessions."""
    md, _, root = setup
    engine = OnnxEngine(root, quant="int4")
    engine.add_adapter("a")
    engine.add_adapter("b")
    ids = ids_for(md, 8)
    params = SamplingParams(max_new_tokens=24)
    expected = engine.generate_ids(ids, params, adapters={"b": 1.0})
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(engine.generate_ids(ids, params, adapters={"b": 1.0}))
        except Exception as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=worker)
    thread.start()
    engine.merge("a")
    thread.join()
    merged = engine.generate_ids(ids, params, adapters={"b": 1.0})
    assert merged != expected and engine.info()["merged"] == {"a": 1.0}
    assert not errors and len(results) == 3
    assert all(r in (expected, merged) for r in results)  # each request saw one base, before or after
