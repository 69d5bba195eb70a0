"""Under load: threads generate with different adapter sets while another adds, swaps and removes adapters.

Every output is checked against a serial reference computed before the soak; a request that names an
adapter being removed may fail with a clean EdgeLoraError, never with anything else and never with
wrong text. Resident memory must stay flat across hundreds of add/remove cycles.
"""

from __future__ import annotations

import os
import random
import threading
import time

import psutil
import pytest
from factories import build_bundle, random_adapter

from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from runtime.sampling import SamplingParams

SOAK_SECONDS = float(os.environ.get("EDGE_LORA_SOAK_SECONDS", "8"))  # per backend; longer on demand
GENERATORS = 3
MAX_RSS_GROWTH_MB = 40
PROMPTS = [[5, 17, 42, 9], [100, 3, 250, 77, 12, 8]]
PARAMS = SamplingParams.from_kwargs(max_new_tokens=6)
# the sets generators use; "churn" is tone's file loaded under another name, added and removed all the time
SETS = [
    {},
    {"sql": 1.0},
    {"tone": 1.0},
    {"sql": 1.0, "tone": 0.5},
    {"churn": 1.0},
    {"sql": 0.7, "churn": 1.0},
]


def reference_key(adapter_set: dict) -> tuple:
    """churn carries tone's weights: its reference is tone's."""
    merged: dict[str, float] = {}
    for name, scale in adapter_set.items():
        real = "tone" if name == "churn" else name
        merged[real] = merged.get(real, 0.0) + scale
    return tuple(sorted(merged.items()))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, model_dirs):
    md = ModelDir(model_dirs["llama"])
    root = tmp_path_factory.mktemp("soak")
    modules = ("q_proj", "v_proj", "o_proj", "down_proj")
    adapters = {}
    for name, seed in (("sql", 11), ("tone", 12)):
        adapters[name] = random_adapter(md, seed, rank=8, alpha=16.0, std=0.1, modules=modules)
        adapters[name].save(root / f"{name}.safetensors")
    return build_bundle(
        md.path, root / "bundle", adapters, backends=("onnx", "gguf")
    ), root / "tone.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_soak_swaps_under_load(bundle, backend):
    import runtime

    root, churn_source = bundle
    engine = runtime.load(root, backend=backend, threads=1)
    engine.add_adapter("sql")
    engine.add_adapter("tone")
    engine.add_adapter("churn", churn_source)
    reference = {}
    for adapter_set in SETS:
        for i, prompt in enumerate(PROMPTS):
            reference[reference_key(adapter_set), i] = engine.generate_ids(
                prompt, PARAMS, adapters=adapter_set
            )
    assert len({tuple(v) for v in reference.values()}) > len(PROMPTS), (
        "adapters do not change the output: weak test"
    )
    defaults = [{}, {"sql": 1.0}, {"tone": 1.0}]

    stop = threading.Event()
    counts = {"served": 0, "refused": 0, "cycles": 0, "swaps": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def generator(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(len(PROMPTS))
            use_default = rng.random() < 0.2
            adapter_set = None if use_default else rng.choice(SETS)
            try:
                out = engine.generate_ids(PROMPTS[i], PARAMS, adapters=adapter_set)
            except EdgeLoraError as err:  # only legitimate when the churn adapter was just removed
                ok = "churn" in (adapter_set or {}) and "churn" in str(err)
                with lock:
                    counts["refused"] += 1
                    if not ok:
                        failures.append(f"unexpected refusal for {adapter_set}: {err}")
                continue
            except Exception as exc:  # noqa: BLE001 - any other failure is a finding
                with lock:
                    failures.append(f"{type(exc).__name__} for {adapter_set}: {exc}")
                return
            allowed = (
                [reference[reference_key(d), i] for d in defaults]
                if use_default
                else [reference[reference_key(adapter_set), i]]
            )
            with lock:
                counts["served"] += 1
                if out not in allowed:
                    failures.append(f"wrong output for {adapter_set} prompt {i}: {out} not in {allowed}")

    def mutator() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            try:
                if "churn" in engine.adapters:
                    engine.remove_adapter("churn")
                else:
                    engine.add_adapter("churn", churn_source)
                    with lock:
                        counts["cycles"] += 1
                engine.set_adapters(rng.choice(defaults))
                with lock:
                    counts["swaps"] += 1
            except Exception as exc:  # noqa: BLE001
                with lock:
                    failures.append(f"mutator: {type(exc).__name__}: {exc}")
                return

    process = psutil.Process()
    warm = [threading.Thread(target=generator, args=(s,)) for s in range(GENERATORS)] + [
        threading.Thread(target=mutator)
    ]
    for t in warm:  # a short warm-up so caches and arenas reach their steady size before measuring
        t.start()
    time.sleep(min(2.0, SOAK_SECONDS / 4))
    rss_start = process.memory_info().rss
    time.sleep(SOAK_SECONDS)
    stop.set()
    for t in warm:
        t.join(timeout=60)
        assert not t.is_alive(), "a thread hung"
    rss_growth_mb = (process.memory_info().rss - rss_start) / 2**20
    print(
        f"\n{backend}: {counts['served']} requests served, {counts['refused']} cleanly refused, "
        f"{counts['cycles']} add/remove cycles, {counts['swaps']} default swaps in {SOAK_SECONDS:.0f} s; "
        f"RSS growth {rss_growth_mb:+.1f} MB"
    )
    assert not failures, "\n".join(failures[:10])
    assert counts["served"] > 20 and counts["cycles"] > 10
    assert rss_growth_mb < MAX_RSS_GROWTH_MB
    scratch = getattr(
        engine, "_tmp", None
    )  # llama.cpp converts path adapters to GGUF files in a scratch folder
    if scratch is not None:
        assert len(os.listdir(scratch.name)) <= len(engine.adapters), (
            "converted adapter files pile up on disk"
        )
