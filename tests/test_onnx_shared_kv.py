"""The fast variant's decode state: KV buffers shared by past and present (GroupQueryAttention
writes in place), grown by doubling; checked against full-sequence logits, PyTorch and transformers.

``KV_BLOCK`` is lowered to 16 so that short sequences on the tiny models (context 256) cross
several growths."""

import gc

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from onnx_helpers import torch_logits

import runtime.onnx.cpu_state as onnx_cpu_state
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from runtime.onnx.backend import OnnxEngine
from runtime.onnx.cpu_state import CpuKVState
from runtime.onnx.decode_states import OnnxState, SharedKVState

TOL = 1e-3  # fp32 ONNX against PyTorch, as in test_onnx_export


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(onnx_cpu_state, "KV_BLOCK", 16)


@pytest.fixture(scope="module")
def setup(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    adapters = {
        "a": random_adapter(md, seed=1, mixed_ranks=1),
        "b": random_adapter(md, seed=2, rank=2, mixed_ranks=1),
    }
    root = build_bundle(
        md.path, tmp_path_factory.mktemp("shared_kv") / "b", adapters, onnx_quants=("fp32", "int4")
    )
    return md, adapters, root


def ids_for(md, n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(3, md.config.vocab_size, n)]


def decode(state, ids, chunks=(5, 25), poison=False):
    """Feed ``ids`` as the given prompt chunks, then one token at a time; logits after each of the
    positions fed singly, the last chunk's last position first. ``poison`` fills every cache
    position past the sequence with NaN before each step: none of them may be read."""
    steps, start = [], 0
    for size in chunks:
        steps = [state.feed(ids[start : start + size])]
        start += size
    for token in ids[start:]:
        if poison:
            for buffer in state.cache:
                buffer[:, :, state.length :] = np.nan
        steps.append(state.feed([token]))
    return np.stack(steps), start


def engine_with_adapters(root, quant, adapters, **options):
    engine = OnnxEngine(root, quant=quant, **options)
    for name in adapters:
        engine.add_adapter(name)
    return engine


def new_state(engine, adapters):
    return engine._new_state(*engine._request_set(adapters))


def test_fast_variant_on_cpu_shares_the_cache(setup, model_dirs, tmp_path):
    _, _, root = setup
    engine = OnnxEngine(root, quant="int4")
    assert engine.sessions.spec.spin is True  # ONNX Runtime's default, as the benchmark peers run
    assert isinstance(new_state(engine, {}), CpuKVState)  # the C API
    assert isinstance(new_state(OnnxEngine(root, quant="int4", session_api="python"), {}), SharedKVState)
    portable = build_bundle(model_dirs["llama"], tmp_path / "p", onnx_variant="portable")
    assert isinstance(new_state(OnnxEngine(portable), {}), OnnxState)


@pytest.mark.parametrize("chosen", [{}, {"a": 1.0}, {"a": 1.0, "b": 0.5}])
def test_decode_across_growth_equals_full_logits_and_pytorch(setup, chosen):
    md, adapters, root = setup
    engine = engine_with_adapters(root, "fp32", adapters)
    ids = ids_for(md, 120)
    state = new_state(engine, chosen)
    steps, start = decode(state, ids, poison=True)
    assert state.capacity == 128 and state.length == 120  # 16 -> 32 (the chunk) -> 64 -> 128
    full = engine.logits(ids, adapters=chosen)
    want = torch_logits(md.path, ids, [(adapters[n], s) for n, s in chosen.items()])
    print(
        f"{chosen}: steps vs full {np.abs(steps - full[start - 1 :]).max():.2e}, "
        f"vs PyTorch {np.abs(steps - want[start - 1 :]).max():.2e}"
    )
    assert np.abs(steps - full[start - 1 :]).max() < 1e-4
    assert np.abs(steps - want[start - 1 :]).max() < TOL and np.abs(full - want).max() < TOL


@pytest.mark.parametrize("chosen", [{}, {"a": 1.0}, {"a": 0.5, "b": 1.0}])
def test_int4_shared_cache_equals_concat_cache(setup, chosen):
    """The C API's shared cache, the Python binding's shared cache and its Concat-style state (new KV
    OrtValues every step) give the same logits."""
    md, adapters, root = setup
    engine = engine_with_adapters(root, "int4", adapters)
    python = engine_with_adapters(root, "int4", adapters, session_api="python")
    ids = ids_for(md, 70, seed=1)
    shared, _ = decode(new_state(engine, chosen), ids)
    bound, _ = decode(new_state(python, chosen), ids)
    choice = python.adapter_sets.choice(*python._request_set(chosen))
    concat, _ = decode(OnnxState(python.decode_setup, choice), ids)
    assert np.abs(shared - concat).max() < 1e-5 and np.abs(bound - concat).max() < 1e-5


def test_capacity_doubles_and_stops_at_the_context(setup):
    md, _, root = setup
    engine = OnnxEngine(root, quant="int4")
    c = md.config
    state = new_state(engine, {})
    state.feed(ids_for(md, 130))
    assert state.capacity == 144  # the first feed rounded up to the block
    assert (
        state.cache[0].shape == (1, c.num_key_value_heads, 144, c.head_dim)
        and len(state.cache) == 2 * c.num_hidden_layers
    )
    before = state.cache[0][:, :, :130].copy()
    state.feed([5])
    state.feed([6] * 13)
    assert state.capacity == 144 and state.length == 144  # full, not grown
    state.feed([7])
    assert state.capacity == c.max_position_embeddings == 256  # doubling would give 288: capped
    assert np.array_equal(state.cache[0][:, :, :130], before)  # the grown cache kept what it held
    state.feed([8] * (256 - state.length))
    with pytest.raises(EdgeLoraError, match="exceed the context"):
        state.feed([9])


def test_sliding_window_matches_transformers(model_dirs, tmp_path):
    """Mistral (window 16) over 70 tokens: GroupQueryAttention's local window on the shared buffer."""
    import torch
    from transformers import AutoModelForCausalLM

    md = ModelDir(model_dirs["mistral"])
    assert md.config.sliding_window == 16
    engine = OnnxEngine(build_bundle(md.path, tmp_path / "b"))
    ids = ids_for(md, 70, seed=2)
    steps, start = decode(new_state(engine, {}), ids, chunks=(20, 3), poison=True)
    model = AutoModelForCausalLM.from_pretrained(
        md.path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    print(f"mistral decode vs transformers {np.abs(steps - want[start - 1 :]).max():.2e}")
    assert np.abs(steps - want[start - 1 :]).max() < TOL
    assert np.abs(engine.logits(ids) - want).max() < TOL


def test_interleaved_states_do_not_disturb_each_other(setup):
    """Three requests (base, bundled adapter, stacked set) feeding in turn, each growing its own cache."""
    md, adapters, root = setup
    engine = engine_with_adapters(root, "fp32", adapters)
    requests = [
        ({}, ids_for(md, 60, seed=3)),
        ({"a": 1.0}, ids_for(md, 60, seed=4)),
        ({"b": 1.0, "a": 0.5}, ids_for(md, 60, seed=5)),
    ]
    states = [new_state(engine, chosen) for chosen, _ in requests]
    got = [[state.feed(ids[:4])] for state, (_, ids) in zip(states, requests)]
    for t in range(4, 60):
        for state, (_, ids), out in zip(states, requests, got):
            out.append(state.feed([ids[t]]))
    for (chosen, ids), out in zip(requests, got):
        assert np.abs(np.stack(out) - engine.logits(ids, adapters=chosen)[3:]).max() < 1e-4, chosen
    assert np.abs(got[0][-1] - got[1][-1]).max() > 1e-2


def test_adapter_removed_mid_request_stays_alive_for_it(setup):
    """A state binds the bundled adapter's values (memory of its reader): removing the adapter
    while the request runs must not free them under it."""
    md, _, root = setup
    engine = OnnxEngine(root, quant="fp32")
    engine.add_adapter("a")
    ids = ids_for(md, 40, seed=6)
    want = engine.logits(ids, adapters={"a": 1.0})
    state = new_state(engine, {"a": 1.0})
    out = [state.feed(ids[:10])]
    engine.remove_adapter("a")
    engine.adapter_sets.cache.clear()
    gc.collect()
    out += [state.feed([t]) for t in ids[10:]]
    assert np.abs(np.stack(out) - want[9:]).max() < 1e-4


def test_feed_returns_logits_that_outlive_the_next_feed(setup):
    md, _, root = setup
    state = new_state(OnnxEngine(root, quant="fp32"), {})
    first = state.feed(ids_for(md, 8))
    kept = first.copy()
    second = state.feed([5])
    assert np.array_equal(first, kept) and not np.array_equal(first, second)
