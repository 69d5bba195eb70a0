"""Sessions specialised to the shape of an adapter set (runtime/onnx/specialised.py): the LoRA graph cut
to the groups a set feeds computes what the LoRA session computes, requests move to it once it is built,
one serves every set of its shape, and a merge forgets it."""

import numpy as np
import onnx
import pytest
from factories import build_bundle, random_adapter

from edge_lora.model_dir import ModelDir
from runtime.onnx.backend import OnnxEngine
from runtime.onnx.specialised import shape_of, specialised_model
from runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def setup(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    rng = np.random.default_rng(4)
    tok = random_adapter(md, seed=4, rank=2, std=0.3, modules=["model.layers.0.self_attn.q_proj"])
    tok.added_tokens = ["<t>"]
    tok.embed_rows = rng.normal(0, 1, (1, md.config.hidden_size)).astype(np.float32)
    tok.head_rows = rng.normal(0, 1, (1, md.config.hidden_size)).astype(np.float32)
    adapters = {
        "a": random_adapter(md, seed=1, mixed_ranks=1),
        "qv": random_adapter(
            md, seed=2, rank=2, modules=["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
        ),
        "d": random_adapter(md, seed=3, dora=True, b_std=0.05),
        "tok": tok,
    }
    root = build_bundle(md.path, tmp_path_factory.mktemp("special") / "b", adapters, onnx_quants=("fp32",))
    return md, root


def _ids(md, n=24, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, md.config.vocab_size, n)]


def _ready(engine, adapters):
    engine.logits([5, 6], adapters=adapters)  # the set's first request starts the build
    engine.wait_specialised()


@pytest.mark.parametrize(
    "adapters", [{"a": 1.0}, {"qv": 0.7}, {"d": 1.0}, {"a": 1.0, "qv": -0.5}, {"tok": 1.0}]
)
def test_specialised_session_computes_what_the_feeds_compute(setup, adapters):
    md, root = setup
    generic = OnnxEngine(root, quant="fp32", specialise=0)
    special = OnnxEngine(root, quant="fp32", specialise=2)
    for engine in (generic, special):
        for name in adapters:
            engine.add_adapter(name)
    ids = _ids(md) + ([md.config.vocab_size] if "tok" in adapters else [])  # the new token too
    want = generic.logits(ids, adapters=adapters)
    _ready(special, adapters)
    info = special.info()["specialised"]
    assert info["built"] == 1 and info["ready"] == 1 and generic.info()["specialised"]["built"] == 0
    # bit for bit: a set's results must not change when its build lands
    np.testing.assert_array_equal(special.logits(ids, adapters=adapters), want)
    greedy = SamplingParams(max_new_tokens=6)
    assert special.generate_ids(ids, greedy, adapters=adapters) == generic.generate_ids(
        ids, greedy, adapters=adapters
    )


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_a_biased_family_gets_the_lora_sessions_bits(model_dirs, tmp_path, quant):
    """Qwen2's q/k/v bias follows the DoRA rescale: the cut keeps that rescale, else ONNX Runtime fuses the
    bias into MatMulNBits and rounds otherwise (int8: 3.6e-7 in the logits, on x86-64 and ARM64)."""
    md = ModelDir(model_dirs["qwen2"])
    adapters = {"a": random_adapter(md, seed=5), "d": random_adapter(md, seed=6, dora=True, b_std=0.05)}
    root = build_bundle(md.path, tmp_path / "q", adapters, onnx_quants=(quant,))
    ids = _ids(md, seed=2)
    for chosen in ({"a": 1.0}, {"d": 1.0}, {"a": 0.5, "d": 1.0}):
        engine = OnnxEngine(root, quant=quant, specialise=1)
        for name in chosen:
            engine.add_adapter(name)
        before = engine.logits(ids, adapters=chosen)  # the LoRA session (the build starts here)
        engine.wait_specialised()
        assert engine.info()["specialised"]["ready"] == 1
        np.testing.assert_array_equal(engine.logits(ids, adapters=chosen), before)


def test_the_graph_keeps_only_what_the_set_uses(setup):
    md, root = setup
    engine = OnnxEngine(root, quant="fp32")
    engine.add_adapter("qv")
    _, loaded = engine._request_set({"qv": 1.0})
    entry = engine.adapter_sets.feeds_for({"qv": 1.0}, loaded)
    graph = onnx.load_from_string(specialised_model(engine.model_path, shape_of(entry["arrays"]))).graph
    full = onnx.load(engine.model_path, load_external_data=False).graph
    kinds = [n.op_type for n in graph.node]
    # two groups touched: two side paths (MatMul A, MatMul B, Add), no DoRA rescale anywhere
    assert sum(n.name.endswith("/lora/Add") for n in graph.node) == 2
    assert not any(n.name.endswith("/lora/DoraScale") for n in graph.node)
    assert len(graph.node) < len(full.node) and kinds.count("MatMul") < [n.op_type for n in full.node].count(
        "MatMul"
    )
    inputs = {i.name for i in graph.input}
    assert {n for n in inputs if ".lora_" in n or n.endswith("dora_scale")} == set(shape_of(entry["arrays"]))
    assert len(shape_of(entry["arrays"])) == 4 and {"input_ids", "attention_mask"} <= inputs


def test_one_session_per_shape_and_merge_forgets_it_and_zero_turns_it_off(setup):
    md, root = setup
    engine = OnnxEngine(root, quant="fp32", specialise=1)
    engine.add_adapter("a")
    engine.add_adapter("qv")
    _ready(engine, {"a": 1.0})
    _ready(engine, {"a": 0.5})  # the same shape: the same session
    assert engine.info()["specialised"]["built"] == 1
    _ready(engine, {"qv": 1.0})  # capacity 1: a's shape is let go
    assert engine.info()["specialised"]["ready"] == 1 and engine.info()["specialised"]["built"] == 2
    _ready(engine, {"a": 1.0})
    ids = _ids(md, seed=1)
    before = engine.logits(ids, adapters={"a": 1.0})
    engine.merge("a")  # the base changed under it
    assert engine.info()["specialised"]["ready"] == 0
    np.testing.assert_allclose(engine.logits(ids), before, atol=1e-4)
    off = OnnxEngine(root, quant="fp32")  # off by default
    off.add_adapter("a")
    _ready(off, {"a": 1.0})
    assert off.info()["specialised"]["built"] == 0


def test_pruned_graph_is_valid_onnx_and_nothing_bypassed_changes_nothing(setup):
    from edge_lora.onnx_format.graph_prune import node_names, prune_nodes

    _, root = setup
    engine = OnnxEngine(root, quant="fp32")
    model = engine.model_path.read_bytes()
    assert prune_nodes(model, set()) == model  # every node of the exported graph is live
    cut = prune_nodes(model, {n for n in node_names(model) if n.endswith("/lora/DoraScale")})
    graph = onnx.load_from_string(cut).graph  # the onnx package reads what the wire-format editor wrote
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    assert all(x in produced for n in graph.node for x in n.input if x)  # nothing reads a removed output
    assert not any(i.name.endswith("dora_scale") for i in graph.input)
    assert len(node_names(cut)) == len(node_names(model)) - sum(
        n.endswith("/lora/DoraScale") for n in node_names(model)
    )
