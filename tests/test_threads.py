"""8 threads generate at once on one engine, each request with its own adapter set: same as serial."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from factories import adapter_file, build_bundle

import runtime

ADAPTER_SETS = [
    {},
    {"a": 1.0},
    {"b": 1.0},
    {"a": 1.0, "b": 0.5},
    {"a": 0.5},
    {"b": 1.0},
    {},
    {"a": 1.0, "b": 1.0},
]
PROMPTS = [
    "The quick brown fox",
    "SELECT name FROM",
    "def add(a, b):",
    "edge-lora trains",
    "Grüße aus",
    "The lazy dog",
    "return a + b",
    "adapters on the host",
]


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    adapters = {
        n: adapter_file(model_dirs["llama"], root / f"{n}.safetensors", seed=s, alpha=4.0, std=0.3)
        for n, s in (("a", 11), ("b", 12))
    }
    return build_bundle(model_dirs["llama"], root / "bundle", adapters, backends=("onnx", "gguf"))


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_eight_threads_with_mixed_adapters_equal_serial_runs(bundle, backend):
    engine = runtime.load(bundle, backend=backend)
    engine.add_adapter("a")
    engine.add_adapter("b")
    engine.set_adapters({"b": 1.0})  # a default set that the per-request sets must override
    requests = [(PROMPTS[i], ADAPTER_SETS[i]) for i in range(8)] * 2

    def run(request):
        prompt, adapters = request
        return engine.generate(prompt, max_new_tokens=12, adapters=adapters)

    serial = [run(r) for r in requests]
    assert len({s for s in serial[:8]}) > 4  # the adapter sets really change the output
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            assert list(pool.map(run, requests)) == serial
    # logits too, mixed with generation
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = engine.tokenizer.encode(PROMPTS[0])
        futures = [pool.submit(engine.logits, ids, adapters=ADAPTER_SETS[i % 8]) for i in range(8)]
        gens = [pool.submit(run, r) for r in requests[:8]]
        for i, f in enumerate(futures):
            assert (f.result() == engine.logits(ids, adapters=ADAPTER_SETS[i % 8])).all()
        assert [g.result() for g in gens] == serial[:8]
