"""KV prefixes kept across adapter switches (runtime/prefix_cache.py): the store's rules, and the engines
(llama.cpp; ONNX Runtime's C API, Python binding and portable variant) giving a fresh engine's tokens and
logits while they restore prefixes across interleaved, stacked and new-token sets."""

import numpy as np
import pytest
from factories import build_bundle, random_adapter

from edge_lora.model_dir import ModelDir
from runtime.prefix_cache import PrefixCache
from runtime.sampling import SamplingParams


def test_longest_shared_prefix_under_the_same_set_wins():
    cache = PrefixCache(max_bytes=1000)
    cache.put("a", [1, 2, 3, 4], "a1234", 10)
    cache.put("a", [1, 2, 9], "a129", 10)
    cache.put("b", [1, 2, 3, 4, 5], "b12345", 10)
    assert cache.best("a", [1, 2, 3, 4, 5, 6], limit=5) == (4, "a1234")
    assert cache.best("a", [1, 2, 3, 7], limit=3) == (3, "a1234")  # diverges after 3: cut back to 3
    assert cache.best("a", [1, 2, 9, 9], limit=2) in ((2, "a1234"), (2, "a129"))
    assert cache.best("a", [7, 7], limit=1) is None  # nothing shared
    assert cache.best("c", [1, 2, 3], limit=2) is None  # another set's state never serves
    assert cache.stats.hits == 3 and cache.stats.misses == 2


def test_bound_in_bytes_least_recently_used_out():
    cache = PrefixCache(max_bytes=25)
    cache.put("a", [1], "a", 10)
    cache.put("b", [1], "b", 10)
    assert cache.best("a", [1, 2], limit=1) == (1, "a")  # "a" now the most recently used
    cache.put("c", [1], "c", 10)
    assert cache.nbytes <= 25 and len(cache) == 2
    assert cache.best("b", [1, 2], limit=1) is None and cache.stats.evicted == 1
    assert not cache.put("d", [1], "d", 26)  # larger than the whole bound: not kept
    cache.put("a", [1, 2, 3], "a123", 10)  # extends "a": the shorter one goes
    assert len(cache) == 2 and cache.best("a", [1, 2, 3, 4], limit=3) == (3, "a123")
    cache.drop(lambda entry: entry[0] == "a")
    assert cache.best("a", [1, 2], limit=1) is None


def test_siblings_on_one_prompt_keep_one_copy_of_it():
    """Requests on one system prompt under one set: the newest state serves the prompt for all of them."""
    cache = PrefixCache(max_bytes=10_000)
    system = list(range(100))
    for user in range(5):
        cache.put("a", system + [1000 + user] * 10, f"s{user}", 100)
    assert len(cache) == 1 and cache.best("a", system + [7], limit=100) == (100, "s4")
    cache.put("a", system[:40] + [5] * 60, "other", 100)  # another prompt that shares less: both kept
    cache.put("b", system + [9] * 10, "b", 100)  # another set: kept
    assert len(cache) == 3


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    rng = np.random.default_rng(3)
    tok = random_adapter(md, seed=3, rank=2, std=0.3)
    tok.added_tokens = ["<sql>"]
    tok.embed_rows = rng.normal(0, 1, (1, md.config.hidden_size)).astype(np.float32)
    tok.head_rows = rng.normal(0, 1, (1, md.config.hidden_size)).astype(np.float32)
    a, b = random_adapter(md, seed=1, std=0.3), random_adapter(md, seed=2, std=0.3)
    adapters = {"a": a, "b": b, "tok": tok}
    root = tmp_path_factory.mktemp("prefix") / "b"
    return build_bundle(md.path, root, adapters, backends=("gguf", "onnx"), gguf_quants=("f32",))


def _engine(bundle, backend="llamacpp", **options):
    import runtime

    if backend == "llamacpp":
        options["precise"] = True
    engine = runtime.load(bundle, backend=backend, threads=2, **options)
    for name in ("a", "b", "tok"):
        engine.add_adapter(name)
    return engine


def test_switching_sets_restores_prefixes_and_changes_nothing(bundle):
    system = [int(t) for t in np.random.default_rng(0).integers(3, 300, 200)]  # a shared "system prompt"
    turns = [
        ({"a": 1.0}, system + [5, 6]),
        ({"b": 1.0}, system + [7]),
        ({"a": 1.0, "b": 0.5}, system + [8, 9]),
        ({"a": 1.0}, system + [10, 11, 12]),  # a's prefix back, after two other sets
        ({}, system + [13]),
        ({"tok": 1.0}, system + [300, 14]),  # 300: the adapter's new token
        ({"b": 1.0}, system + [7, 15]),
        ({"a": 1.0, "b": 0.5}, system + [8, 9, 16]),
    ]
    greedy = SamplingParams(max_new_tokens=6)
    cached, fresh = _engine(bundle), _engine(bundle, prefix_cache_bytes=0)
    for adapters, prompt in turns:
        assert cached.generate_ids(prompt, greedy, adapters=adapters) == fresh.generate_ids(
            prompt, greedy, adapters=adapters
        ), adapters
    stats = cached.info()["prefix_cache"]
    # a set seen before restores its own state: turns 4 (a), 7 (b) and 8 (a+b)
    assert stats["hits"] == 3 and stats["tokens_reused"] >= 3 * len(system), stats
    assert stats["bytes"] <= stats["max_bytes"]
    assert fresh.info()["prefix_cache"] is None
    # logits after a restore are a fresh engine's (to float rounding: its batches are cut elsewhere)
    cached.generate_ids(system + [1], greedy, adapters={"b": 1.0})
    cached.generate_ids(system + [2], greedy, adapters={"a": 1.0})
    ids = system + [3, 4]
    state = cached._new_state({"b": 1.0}, {"b": cached._adapters["b"]})
    np.testing.assert_allclose(state.feed(ids), fresh.logits(ids, adapters={"b": 1.0})[-1], atol=1e-5, rtol=0)
    assert cached.info()["prefix_cache"]["hits"] == 6  # b, a, then b again: each restored
    cached.close()
    fresh.close()


def test_removed_adapter_states_are_dropped_and_the_bound_holds(bundle):
    engine = _engine(bundle, prefix_cache_bytes=300_000)  # room for a few short prefixes only
    greedy = SamplingParams(max_new_tokens=2)
    for i in range(6):
        for adapters in ({"a": 1.0}, {"b": 1.0}, {}):
            engine.generate_ids([5 + i] * 40, greedy, adapters=adapters)
    info = engine.info()["prefix_cache"]
    assert 0 < info["bytes"] <= 300_000 and info["evicted"] > 0, info
    engine.remove_adapter("a")
    engine.add_adapter("a")
    before = engine.info()["prefix_cache"]["hits"]
    engine.generate_ids([5] * 40, greedy, adapters={"a": 1.0})
    engine.generate_ids([5] * 40, greedy, adapters={})
    engine.generate_ids([5] * 40, greedy, adapters={"a": 1.0})  # only the new adapter's own state serves
    assert engine.info()["prefix_cache"]["hits"] >= before
    engine.close()


@pytest.mark.parametrize("session_api", ["c", "python"])
def test_onnx_requests_start_from_a_prefix_left_under_their_set(bundle, session_api):
    system = [int(t) for t in np.random.default_rng(1).integers(3, 300, 150)]
    turns = [
        ({"a": 1.0}, system + [5]),
        ({"b": 1.0}, system + [6]),
        ({"a": 1.0}, system + [7, 8]),  # a's own prefix: restored
        ({"a": 1.0, "b": 0.5}, system + [9]),
        ({"b": 1.0}, system + [6, 10]),  # b's whole prompt and more
        ({"tok": 1.0}, system + [300]),
        ({"tok": 1.0}, system + [300, 11]),
        ({}, system + [12]),
        ({}, system + [13]),
    ]
    greedy = SamplingParams(max_new_tokens=5)
    cached = _engine(bundle, "onnx", session_api=session_api)
    fresh = _engine(bundle, "onnx", prefix_cache_bytes=0, session_api=session_api)
    assert cached.session_api == session_api
    for adapters, prompt in turns:
        assert cached.generate_ids(prompt, greedy, adapters=adapters) == fresh.generate_ids(
            prompt, greedy, adapters=adapters
        ), adapters
    stats = cached.info()["prefix_cache"]
    assert stats["hits"] == 4 and stats["tokens_reused"] >= 4 * len(system), stats
    assert 0 < stats["bytes"] <= stats["max_bytes"]
    ids = system + [14, 15]
    state = cached._request_state({"a": 1.0}, {"a": cached._adapters["a"]})
    np.testing.assert_allclose(state.feed(ids), fresh.logits(ids, adapters={"a": 1.0})[-1], atol=1e-4, rtol=0)
    state.close()
    cached.remove_adapter("a")
    kept_sets = [set_key[0] for set_key, _tokens in cached._prefixes._entries]
    assert not any(name == "a" for names in kept_sets for name, _scale in names), "a's states kept"


def test_the_portable_variant_keeps_prefixes_too(model_dirs, tmp_path):
    """The Concat-cache state (new KV values each run): its positions are copied out at close and in
    before a later request's first run, with a fresh engine's tokens."""
    md = ModelDir(model_dirs["llama"])
    adapters = {"a": random_adapter(md, seed=1, std=0.3), "b": random_adapter(md, seed=2, std=0.3)}
    root = build_bundle(md.path, tmp_path / "p", adapters, onnx_variant="portable")
    system = [int(t) for t in np.random.default_rng(2).integers(3, 300, 60)]
    turns = [({"a": 1.0}, system + [5]), ({"b": 1.0}, system + [6]), ({"a": 1.0}, system + [7, 8])]
    greedy = SamplingParams(max_new_tokens=4)
    import runtime

    engines = [runtime.load(root, threads=2, prefix_cache_bytes=size) for size in (8 << 20, 0)]
    for engine in engines:
        engine.add_adapter("a")
        engine.add_adapter("b")
    cached, fresh = engines
    for adapters, prompt in turns:
        assert cached.generate_ids(prompt, greedy, adapters=adapters) == fresh.generate_ids(
            prompt, greedy, adapters=adapters
        ), adapters
    stats = cached.info()["prefix_cache"]
    assert stats["hits"] == 1 and stats["tokens_reused"] >= len(system), stats
