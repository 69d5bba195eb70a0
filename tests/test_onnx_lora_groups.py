"""One LoRA pair per fused group in the ONNX decoder: A^T side by side along the rank, B^T
block-diagonal. Partial groups (PEFT's q+v default), stacked adapters of different ranks and module
sets, float16 feeds, the node count, and the refusal of layouts from the per-module days."""

import json
import shutil

import numpy as np
import onnx
import pytest
from factories import build_bundle, random_adapter
from onnx_helpers import torch_logits

from converters.onnx_export import PLAIN_MODEL_FILE, export_onnx
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import lora_feeds, names
from edge_lora.onnx_format.layout import read_layout
from runtime.onnx.backend import OnnxEngine

TOL = 1e-3


def ids_for(md, n=20, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, md.config.vocab_size, n)]


def lora_matmuls(model: onnx.ModelProto) -> list:
    """MatMul nodes fed by a LoRA input, directly or through its Cast."""
    fed = {i.name for i in model.graph.input if i.name.endswith((".lora_A.T", ".lora_B.T"))}
    fed |= {o for n in model.graph.node if n.op_type == "Cast" and fed & set(n.input) for o in n.output}
    return [n for n in model.graph.node if n.op_type == "MatMul" and fed & set(n.input)]


def test_stack_lora_fills_block_diagonal_b_and_leaves_untouched_groups_out(model_dirs):
    md = ModelDir(model_dirs["llama"])
    slots = names.lora_slots(md.config)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    one = random_adapter(md, seed=1, rank=2, modules=[q, v], mixed_ranks=1)  # ranks 2 and 3
    two = random_adapter(md, seed=2, rank=5, modules=[v, "lm_head"], mixed_ranks=1)
    feeds = lora_feeds.stack_lora([(one, 1.0), (two, 0.5)], slots)
    group = "model.layers.0.self_attn.qkv_proj"
    assert set(feeds) == {
        names.lora_a(group),
        names.lora_b(group),
        names.lora_a("lm_head"),
        names.lora_b("lm_head"),
    }
    a, b = feeds[names.lora_a(group)], feeds[names.lora_b(group)]
    c = md.config
    assert a.shape == (c.hidden_size, 2 + 3 + 5) and b.shape == (10, c.q_dim + 2 * c.kv_dim)
    assert a.flags.c_contiguous and b.flags.c_contiguous and a.dtype == b.dtype == np.float32
    assert not b[:, c.q_dim : c.q_dim + c.kv_dim].any()  # k: no adapter touches it
    x = np.random.default_rng(0).normal(size=(3, c.hidden_size)).astype(np.float32)
    want = {q: one.delta(q), v: one.delta(v) + 0.5 * two.delta(v)}
    got = x @ a @ b
    np.testing.assert_allclose(got[:, : c.q_dim], x @ want[q].T, atol=1e-4)
    np.testing.assert_allclose(got[:, c.q_dim + c.kv_dim :], x @ want[v].T, atol=1e-4)
    half = lora_feeds.stack_lora([(one, 1.0)], slots, np.float16)
    assert half[names.lora_b(group)].dtype == np.float16
    np.testing.assert_allclose(half[names.lora_b(group)], feeds[names.lora_b(group)][:5], atol=2e-3)


def test_large_feed_blocks_are_mapped_zeroed_and_give_the_same_feeds(model_dirs, monkeypatch):
    """Above POPULATE_FROM a set's feeds are one anonymous mapping filled by the kernel at once (no huge-page
    compaction at first touch): zeroed, writable, aligned views; the feeds equal the small path's."""
    views = lora_feeds.zeroed_views([(1000, 1100), (3, 5), (700, 900)], np.float32)
    assert sum(v.nbytes for v in views) > lora_feeds.POPULATE_FROM
    for view in views:
        assert view.flags.writeable and view.dtype == np.float32 and not view.any()
        assert view.ctypes.data % 64 == 0
        view[...] = 1.0  # the views do not overlap
    assert all((v == 1.0).all() for v in views)
    md = ModelDir(model_dirs["llama"])
    one = random_adapter(md, seed=3, rank=4)
    slots = names.lora_slots(md.config)
    small = lora_feeds.stack_lora([(one, 0.5)], slots)
    monkeypatch.setattr(lora_feeds, "POPULATE_FROM", 0)
    mapped = lora_feeds.stack_lora([(one, 0.5)], slots)
    assert set(mapped) == set(small)
    for name, value in small.items():
        np.testing.assert_array_equal(mapped[name], value)


def test_lora_groups_follow_the_fused_weights(model_dirs):
    md = ModelDir(model_dirs["llama"])
    groups = names.lora_groups(md.config)
    c = md.config
    assert len(groups) == 4 * c.num_hidden_layers + 1  # untied: lm_head has its own
    assert [m for m, _, _ in groups["model.layers.1.self_attn.qkv_proj"]] == [
        f"model.layers.1.self_attn.{p}_proj" for p in "qkv"
    ]
    assert [out for _, out, _ in groups["model.layers.1.mlp.gate_up_proj"]] == [c.intermediate_size] * 2
    assert sorted(m for members in groups.values() for m, _, _ in members) == sorted(names.lora_slots(c))


@pytest.mark.parametrize("variant", ["fast", "portable"])
def test_peft_q_v_adapter_matches_peft(model_dirs, tmp_path, variant):
    """PEFT's default targets (q and v): the group's k columns stay zero, through both the
    bundle's .onnx_adapter and numpy feeds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf

    from converters.peft import import_peft

    md = ModelDir(model_dirs["llama"])
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_hf(md.path),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
    )
    with torch.no_grad():  # B starts at zero; give it values so the test means something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = import_peft(tmp_path / "peft", base=md.config, base_fingerprint=md.fingerprint)
    assert {m.rsplit(".", 1)[1] for m in adapter.modules} == {"q_proj", "v_proj"}
    ids = ids_for(md)
    with torch.no_grad():
        want = peft_model.eval()(torch.tensor([ids])).logits[0].numpy()
    root = build_bundle(md.path, tmp_path / "b", {"qv": adapter}, onnx_variant=variant)
    engine = OnnxEngine(root)
    engine.add_adapter("qv")  # from the bundle
    engine.add_adapter("qv_file", root / "adapters" / "qv.safetensors")  # a loose file
    assert all(((n, 1.0),) in engine.adapter_sets.cache for n in ("qv", "qv_file"))  # each stacked when added
    for name in ("qv", "qv_file"):
        diff = np.abs(engine.logits(ids, adapters={name: 1.0}) - want).max()
        print(f"{variant} q+v {name}: max |diff| vs peft {diff:.2e}")
        assert diff < TOL
    assert np.abs(engine.logits(ids, adapters={}) - want).max() > 1e-2  # the adapter moved the logits


def test_stacked_adapters_of_different_ranks_and_modules_match_reference(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    slots = names.lora_slots(md.config)
    mlp_and_head = [m for m in slots if ".mlp." in m or m == "lm_head"]
    q_and_v = [m for m in slots if m.endswith(("q_proj", "v_proj"))]
    adapters = {
        "wide": random_adapter(md, seed=1, rank=2, mixed_ranks=1),  # all-linear, ranks 2..4
        "narrow": random_adapter(
            md, seed=2, rank=8, modules=mlp_and_head, mixed_ranks=1
        ),  # ranks 8..10, lm_head too
        "qv": random_adapter(md, seed=3, rank=3, modules=q_and_v, mixed_ranks=1),
    }
    root = build_bundle(md.path, tmp_path / "b", adapters)
    engine = OnnxEngine(root)
    for name in adapters:
        engine.add_adapter(name)
    ids = ids_for(md)
    for chosen in (
        {"wide": 1.0, "narrow": -0.7},
        {"narrow": 0.5, "qv": 1.0},
        {"wide": 0.3, "narrow": 1.0, "qv": 2.0},
    ):
        want = torch_logits(md.path, ids, [(adapters[n], s) for n, s in chosen.items()])
        diff = np.abs(engine.logits(ids, adapters=chosen) - want).max()
        print(f"stacked {chosen}: max |diff| {diff:.2e}")
        assert diff < TOL


@pytest.mark.parametrize("lora_dtype,per_group", [("float32", 3), ("float16", 5)])
def test_lora_graph_has_three_nodes_per_group(model_dirs, tmp_path, lora_dtype, per_group):
    """MatMul A, MatMul B, Add per group (plus a Cast each for float16 feeds), and no other change
    from the plain graph; float16 feeds still match the reference."""
    import onnxruntime as ort

    md = ModelDir(model_dirs["llama"])
    path = export_onnx(md, tmp_path, "fp32", "fast", lora_dtype=lora_dtype)
    model = onnx.load(str(path), load_external_data=False)
    plain = onnx.load(str(tmp_path / PLAIN_MODEL_FILE), load_external_data=False)
    groups = names.lora_groups(md.config)
    assert len(lora_matmuls(model)) == 2 * len(groups)
    # + the DoRA rescale Mul per group; the new-token nodes ("Added") are counted by their own tests
    ours = [
        n
        for n in model.graph.node
        if "/lora/" in n.name and n.name.split("/")[0] in groups and "Added" not in n.name
    ]
    assert len(ours) == (per_group + 1) * len(groups) and not {n.name for n in ours} & {
        n.name for n in plain.graph.node
    }
    assert json.loads((tmp_path / names.LAYOUT_FILE).read_text())["lora_groups"] == {
        g: [list(m) for m in members] for g, members in groups.items()
    }
    adapter = random_adapter(
        md,
        seed=4,
        modules=[m for m in names.lora_slots(md.config) if not m.endswith("k_proj")],
        mixed_ranks=1,
    )
    ids = ids_for(md)
    c = md.config
    feeds = {
        names.INPUT_IDS: np.array([ids], np.int64),
        names.ATTENTION_MASK: np.ones((1, len(ids)), np.int64),
    }
    for i in range(c.num_hidden_layers):
        for name in (names.past_key(i), names.past_value(i)):
            feeds[name] = np.zeros((1, c.num_key_value_heads, 0, c.head_dim), np.float32)
    feeds.update(
        lora_feeds.stack_lora(
            [(adapter, 1.0)], names.lora_slots(c), np.float16 if lora_dtype == "float16" else np.float32
        )
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    got = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
        [names.LOGITS], feeds
    )[0][0]
    diff = np.abs(got - torch_logits(md.path, ids, [(adapter, 1.0)])).max()
    print(f"{lora_dtype} feeds: max |diff| {diff:.2e}")
    assert diff < (TOL if lora_dtype == "float32" else 2e-2)


def test_layout_from_per_module_days_is_refused(model_dirs, tmp_path):
    md = ModelDir(model_dirs["smollm"])
    root = build_bundle(md.path, tmp_path / "b")
    copy = shutil.copytree(root, tmp_path / "old")
    layout_path = copy / "onnx" / "fp32-fast" / names.LAYOUT_FILE
    layout = json.loads(layout_path.read_text())
    layout["version"] = 1
    del layout["lora_groups"]
    layout_path.write_text(json.dumps(layout))
    for attempt in (
        lambda: read_layout(layout_path.parent / names.MODEL_FILE),
        lambda: OnnxEngine(copy, verify_hashes=False),
    ):
        with pytest.raises(EdgeLoraError, match="re-export the bundle") as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and str(layout_path) in message and "version 1" in message
