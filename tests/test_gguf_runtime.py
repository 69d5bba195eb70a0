"""The llama.cpp engine: hot swap without stale cache, stacking equals merging, per-request sets,
threads, the high-level llama_cpp.Llama loading our files, and C failures as clear errors."""

import threading

import numpy as np
import pytest
from factories import build_bundle, random_adapter

from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from runtime.sampling import SamplingParams

PROMPT = [5, 17, 42, 99, 120, 7, 33]
GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    md = ModelDir(model_dirs["llama"])
    adapters = {
        "a": random_adapter(md, seed=1, std=0.3),
        "b": random_adapter(md, seed=2, rank=8, rslora=True, std=0.3),
    }
    root = tmp_path_factory.mktemp("rt") / "b"
    return build_bundle(md.path, root, adapters, backends=("gguf",), gguf_quants=("f32", "q8_0"))


def _engine(bundle, *names, **options):
    import runtime

    engine = runtime.load(bundle, backend="llamacpp", **options)
    for n in names:
        engine.add_adapter(n)
    return engine


def test_swap_a_b_a_none_equals_fresh_contexts(bundle):
    engine = _engine(bundle, "a", "b")
    sequence = [{"a": 1.0}, {"b": 1.0}, {"a": 1.0}, {}]
    swapped = [engine.generate_ids(PROMPT, GREEDY, adapters=s) for s in sequence]
    logits_swapped = [engine.logits(PROMPT, adapters=s) for s in sequence]
    for s, ids, logits in zip(sequence, swapped, logits_swapped):
        fresh = _engine(bundle, *s)
        assert fresh.generate_ids(PROMPT, GREEDY, adapters=s) == ids
        np.testing.assert_array_equal(fresh.logits(PROMPT, adapters=s), logits)
    assert swapped[0] != swapped[1] and swapped[0] == swapped[2]


def test_kv_cache_prefix_reused_only_under_same_set(bundle):
    engine = _engine(bundle, "a")
    first = engine.generate_ids(PROMPT, GREEDY, adapters={"a": 1.0})
    # same set: the prompt prefix is reused from the cache; the result must not change
    assert engine.generate_ids(PROMPT, GREEDY, adapters={"a": 1.0}) == first
    assert engine._cache_tokens[: len(PROMPT)] == PROMPT
    base = engine.generate_ids(PROMPT, GREEDY, adapters={})  # other set: cache dropped, not reused
    assert base == _engine(bundle).generate_ids(PROMPT, GREEDY, adapters={})
    longer = PROMPT + first[:3]
    assert engine.generate_ids(longer, GREEDY, adapters={"a": 1.0}) == first[3:] + _tail(
        bundle, longer, len(first) - 3
    )


def _tail(bundle, prompt, skip):
    fresh = _engine(bundle, "a").generate_ids(prompt, GREEDY, adapters={"a": 1.0})
    return fresh[skip:]


def test_stacked_equals_merged(bundle):
    stacked = _engine(bundle, "a", "b", precise=True).logits(PROMPT, adapters={"a": 1.0, "b": 0.5})
    merged_engine = _engine(bundle, "a", "b", precise=True)
    merged_engine.merge("a", 1.0)
    merged_engine.merge("b", 0.5)
    merged = merged_engine.logits(PROMPT, adapters={})
    diff = np.abs(stacked - merged).max()
    print(f"stacked a+0.5b vs merged (f32): max |logit diff| = {diff:.2e}")
    assert diff < 1e-3
    assert merged_engine.info()["merged"] == {"a": 1.0, "b": 0.5}
    # adapters stay usable on the merged model: a on top of merged(a + 0.5 b)
    assert merged_engine.logits(PROMPT, adapters={"a": 1.0}).shape == merged.shape


def test_merge_on_quantized_base_requantizes(bundle):
    stacked = _engine(bundle, "a", quant="q8_0").logits(PROMPT, adapters={"a": 1.0})
    engine = _engine(bundle, "a", quant="q8_0")
    engine.merge("a")
    merged = engine.logits(PROMPT, adapters={})
    top1 = float((stacked.argmax(-1) == merged.argmax(-1)).mean())
    print(
        f"q8_0 merged vs unmerged: max |logit diff| = {np.abs(stacked - merged).max():.3f}, "
        f"top-1 agreement {top1:.2f}"
    )
    assert np.abs(stacked - merged).max() < 0.1


def test_default_set_and_per_request_set(bundle):
    engine = _engine(bundle, "a", "b")
    engine.set_adapters({"b": 1.0})
    with_default = engine.generate_ids(PROMPT, GREEDY)
    assert with_default == engine.generate_ids(PROMPT, GREEDY, adapters={"b": 1.0})
    assert engine.generate_ids(PROMPT, GREEDY, adapters={}) != with_default
    text = engine.generate(PROMPT, max_new_tokens=6, adapters={"a": 1.0}, stream=True)
    assert "".join(text) == engine.generate(PROMPT, max_new_tokens=6, adapters={"a": 1.0})
    sampled = [
        engine.generate(PROMPT, max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=3)
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_threads_get_serial_results(bundle):
    engine = _engine(bundle, "a", "b")
    sets = [{"a": 1.0}, {"b": 1.0}, {}, {"a": 0.5, "b": 0.5}] * 2
    serial = [engine.generate_ids(PROMPT, GREEDY, adapters=s) for s in sets]
    results = [None] * len(sets)

    def run(i):
        results[i] = engine.generate_ids(PROMPT, GREEDY, adapters=sets[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_adapter_file_outside_bundle_converted_on_the_fly(bundle, model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    extra = random_adapter(md, seed=11, rank=2, std=0.3, mixed_ranks=2)
    extra.save(tmp_path / "extra.safetensors")
    engine = _engine(bundle)
    engine.add_adapter("extra", tmp_path / "extra.safetensors")
    assert engine.generate_ids(PROMPT, GREEDY, adapters={"extra": 1.0}) != engine.generate_ids(
        PROMPT, GREEDY, adapters={}
    )
    engine.remove_adapter("extra")
    with pytest.raises(EdgeLoraError, match="no adapter 'extra'"):
        engine.generate_ids(PROMPT, GREEDY, adapters={"extra": 1.0})


def test_high_level_llama_loads_our_files(bundle):
    import llama_cpp

    ours = _engine(bundle, "a").logits(PROMPT, adapters={"a": 1.0})
    llm = llama_cpp.Llama(
        model_path=str(bundle / "gguf/model-f32.gguf"),
        lora_path=str(bundle / "adapters/a.gguf"),
        logits_all=True,
        n_ctx=64,
        verbose=False,
    )
    llm.eval(PROMPT)
    theirs = np.array(llm.scores[: len(PROMPT)])
    assert np.abs(theirs - ours).max() < 1e-3


def test_c_failures_become_clear_errors(bundle, model_dirs, tmp_path):
    import shutil

    import runtime

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    with open(broken / "gguf/model-f32.gguf", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(EdgeLoraError, match="could not load this GGUF"):
        runtime.load(broken, backend="llamacpp", verify_hashes=False)
    with pytest.raises(EdgeLoraError, match="SHA-256"):
        runtime.load(broken, backend="llamacpp")
    engine = _engine(bundle)
    with pytest.raises(EdgeLoraError, match="could not load this LoRA"):
        engine._model.load_lora(bundle / "gguf/model-q8_0.gguf")  # a model, not an adapter: NULL pointer
    with pytest.raises(EdgeLoraError, match="exceed the context"):
        engine.logits(list(range(5, 100)) * 3)
    other = random_adapter(ModelDir(model_dirs["qwen2"]), seed=1, std=0.3)
    other.save(tmp_path / "qwen.safetensors")
    with pytest.raises(EdgeLoraError, match="wrong base"):
        engine.add_adapter("q", tmp_path / "qwen.safetensors")


def test_extra_bufts_decided_from_cpu(tmp_path):
    import runtime.llamacpp.lib as lib

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor : 0\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile amx_int8\n")
    plain.write_text("processor : 0\nflags\t\t: fpu sse avx2 fma\n")
    assert lib.cpu_has_amx(str(amx)) and not lib.cpu_has_amx(str(plain))
    assert not lib.cpu_has_amx(str(tmp_path / "missing"))


def test_memory_knobs_keep_the_logits(bundle):
    """Reading the file instead of mapping it, and a smaller compute graph per batch, change memory only:
    the logits of a prompt longer than n_ubatch (several graphs) are the same."""
    prompt = PROMPT * 6
    default = _engine(bundle, "a", quant="q8_0")
    info = default.info()
    assert info["n_batch"] == info["n_ubatch"] == min(512, info["kv_positions"])  # the KV cache's size now
    assert info["mmap"] == (not info["use_extra_bufts"])  # a repacked copy must not leave the mapped one
    small = _engine(bundle, "a", quant="q8_0", mmap=False, n_ubatch=16, n_ctx=128)
    assert (small.info()["mmap"], small.info()["n_ubatch"], small.max_context) == (False, 16, 128)
    for chosen in ({}, {"a": 1.0}):
        want = default.logits(prompt, adapters=chosen)
        np.testing.assert_allclose(small.logits(prompt, adapters=chosen), want, atol=1e-4)
        want = default.generate_ids(PROMPT, GREEDY, adapters=chosen)
        assert small.generate_ids(PROMPT, GREEDY, adapters=chosen) == want


def test_kv_cache_grows_with_use_and_keeps_the_logits(bundle):
    """A context that starts small and doubles when a request needs more gives the logits and text of
    one allocated whole; past n_ctx the request is refused, saying so."""
    prompt = (PROMPT * 6)[:40]
    whole = _engine(bundle, "a", quant="q8_0", n_ctx=128, n_ctx_start=None)
    grown = _engine(bundle, "a", quant="q8_0", n_ctx=128, n_ctx_start=16)
    assert (whole.info()["kv_positions"], grown.info()["kv_positions"]) == (128, 16)
    for chosen in ({"a": 1.0}, {}):
        np.testing.assert_allclose(
            grown.logits(prompt, adapters=chosen), whole.logits(prompt, adapters=chosen), atol=1e-4
        )
        assert grown.generate_ids(prompt, GREEDY, adapters=chosen) == whole.generate_ids(
            prompt, GREEDY, adapters=chosen
        )
    assert grown.info()["kv_positions"] == 80  # 16 -> 40 (the prompt) -> 80 (doubled for its 12 tokens)
    with pytest.raises(EdgeLoraError, match="exceed the context of 128"):
        grown.logits(PROMPT * 20, adapters={})
