"""The runtime on a GPU, both backends: ONNX Runtime's WebGPU provider and llama.cpp's Vulkan backend.

On a machine without a GPU these run on Mesa's lavapipe (scripts/software-gpu.sh; the switches are
set in tests/gpu_env.py). Each GPU engine is checked against the same bundle on the CPU: fp32
logits within 1e-3, 4-bit greedy tokens at >= 99% of positions, swaps equal to fresh engines, a
stacked set equal to the merged weights, eight threads equal to serial runs, and, for ONNX, where
every node runs and what crosses the bus per decode step.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from gpu_env import child_env
from tiny_models import FAMILIES

import runtime
from converters.export import AdapterSource, ExportOptions, export_bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

BACKENDS = {"onnx": ("fp32", "int4"), "llamacpp": ("f32", "q4_0")}  # backend -> (float quant, 4-bit quant)
SETS = [{}, {"a": 1.0}, {"b": 1.0}, {"a": 1.0, "b": 0.5}]


@pytest.fixture(scope="module")
def bundles(model_dirs, tmp_path_factory):
    """family -> a bundle with both backends at float and 4 bits, adapter ``a`` on every linear
    layer and ``b`` on q/v only (on the GPU the other groups get zero pads, never zero-size tensors)."""
    root = tmp_path_factory.mktemp("gpu")
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            md = ModelDir(model_dirs[family])
            sources = []
            for name, adapter in (
                ("a", random_adapter(md, 1, rank=4, alpha=4.0, b_std=0.1, mixed_ranks=1)),
                (
                    "b",
                    random_adapter(
                        md,
                        2,
                        rank=8,
                        alpha=8.0,
                        b_std=0.1,
                        modules=[m for m in linear_modules(md.config) if m.endswith(("q_proj", "v_proj"))],
                        mixed_ranks=1,
                    ),
                ),
            ):
                path = root / f"{family}-{name}.safetensors"
                adapter.save(path)
                sources.append(AdapterSource(path, name))
            options = ExportOptions(
                backends=["onnx", "gguf"], onnx_quants=["fp32", "int4"], gguf_quants=["f32", "q4_0"]
            )
            made[family] = export_bundle(md.path, root / family, sources, options, show_progress=False)
        return made[family]

    return get


def open_engine(bundle: Path, backend: str, quant: str, device: str, adapters=("a", "b")):
    extra = {"precise": True} if backend == "llamacpp" else {}  # f32 KV cache on both devices
    engine = runtime.load(bundle, backend=backend, quant=quant, device=device, **extra)
    for name in adapters:
        engine.add_adapter(name)
    return engine


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    device_fixture = {"onnx": "webgpu_device", "llamacpp": "vulkan_device"}[request.param]
    request.getfixturevalue(device_fixture)  # skipped (or failed in CI) without a GPU device
    return request.param


def prompts(bundle: Path) -> list[list[int]]:
    tokenizer = Tokenizer(bundle / "tokenizer.json")
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "SELECT name FROM users WHERE id = 42;",
        "def add(a, b):\n    return a + b\n",
        "edge-lora trains adapters on the host and runs them on the device.",
    ]
    return [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("family", FAMILIES)
def test_float_logits_on_the_gpu_equal_the_cpu(bundles, family, backend):
    bundle = bundles(family)
    quant = BACKENDS[backend][0]
    gpu, cpu = open_engine(bundle, backend, quant, "gpu"), open_engine(bundle, backend, quant, "cpu")
    assert gpu.info()["device"]["kind"] == "gpu" and cpu.info()["device"]["kind"] == "cpu"
    ids = prompts(bundle)[3]
    for adapters in SETS:
        theirs, ours = cpu.logits(ids, adapters=adapters), gpu.logits(ids, adapters=adapters)
        assert np.abs(ours - theirs).max() < 1e-3, adapters
    assert (
        np.abs(cpu.logits(ids, adapters={"a": 1.0}) - cpu.logits(ids)).max() > 0.05
    )  # the adapter really moves them


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_greedy_tokens_on_the_gpu_agree_with_the_cpu(bundles, family, backend):
    """>= 99% of positions where the CPU's choice is decisive. The tiny random models' logits are
    nearly flat, so ~1% of positions are ties that the 4-bit kernels' own rounding (int8
    activations on the CPU, f32 on the GPU: ~3e-3) decides either way; every disagreement must be
    such a tie, and even counting them, >= 96% agree (the share of ties depends on the weights' draw:
    368/380 on the llama model with searched 4-bit scales, all of them ties)."""
    bundle = bundles(family)
    quant = BACKENDS[backend][1]
    gpu, cpu = open_engine(bundle, backend, quant, "gpu"), open_engine(bundle, backend, quant, "cpu")
    same = total = ties = 0
    for ids in prompts(bundle):
        for adapters in SETS:
            ours, theirs = gpu.logits(ids, adapters=adapters), cpu.logits(ids, adapters=adapters)
            for pos in np.flatnonzero(ours.argmax(-1) != theirs.argmax(-1)):
                margin = (
                    theirs[pos].max() - theirs[pos, ours[pos].argmax()]
                )  # how much the CPU prefers its own token
                assert margin <= 2 * np.abs(ours[pos] - theirs[pos]).max(), (adapters, pos, margin)
                ties += 1
            same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(ids)
    assert same / total >= 0.96, f"{same}/{total}"
    assert same / (total - ties) >= 0.99


# --- strong adapters against transformers + PEFT (the figures docs/mobile.md gives) -------------------

STRONG_FAMILIES = ("llama3", "mistral", "qwen2")
STRONG_SEEDS = (1, 2, 3)
# what each setting may differ from transformers + PEFT by; measured on lavapipe (Mesa 22.3, llama.cpp's
# Vulkan build of tests/gpu_env.py's setup): 1.3e-5, 1.9e-2, 2.8e-2, 3.9e-4, 1.8e-2, 1.4e-5
STRONG_BOUNDS = {
    "webgpu": 1e-4,  # ONNX Runtime's WebGPU provider, fp32
    "vulkan_f32": 5e-2,  # llama.cpp Vulkan, f32 shaders (GGML_VK_DISABLE_F16) and f32 KV cache (precise)
    "vulkan_default": 6e-2,  # llama.cpp Vulkan as an app gets it: f16 shaders, f16 KV cache
    "vulkan_default_base": 2e-3,  # the same, base model alone
    "cpu_default": 5e-2,  # llama.cpp CPU at its f16-KV default
    "cpu_f32": 1e-4,  # llama.cpp CPU, f32 KV cache (precise)
}

VULKAN_DEFAULT_SCRIPT = """
import json, sys
import numpy as np
import runtime

bundle, ids, names, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
rows = []
for precise in (False, True):
    engine = runtime.load(bundle, backend="llamacpp", quant="f32", device="gpu", precise=precise)
    assert engine.info()["device"]["kind"] == "gpu", engine.info()["device"]
    for name in names:
        engine.add_adapter(name)
    rows += [engine.logits(ids, adapters=s) for s in [{}] + [{name: 1.0} for name in names]]
np.save(out, np.stack(rows))
"""


def vulkan_default_logits(bundle: Path, ids: list[int], names: list[str], out: Path) -> np.ndarray:
    """llama.cpp's Vulkan backend at its defaults (f16 shaders, f16 KV cache), as an app gets it: a
    process of its own, since the backend reads GGML_VK_DISABLE_F16 once per process and this one
    runs with it set. Rows: the base, then each adapter alone; then the same with an f32 KV cache
    (``precise``, f16 shaders still)."""
    import subprocess
    import sys

    env = child_env(gpu=True)  # the software Vulkan device, on purpose ...
    env.pop("GGML_VK_DISABLE_F16", None)  # ... at its f16 default
    done = subprocess.run(
        [sys.executable, "-c", VULKAN_DEFAULT_SCRIPT, str(bundle), json.dumps(ids), json.dumps(names)]
        + [str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # the first run on a machine compiles the f16 shaders (minutes on a loaded one)
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(out)


def test_strong_adapters_on_the_gpu_against_transformers_peft(
    model_dirs, tmp_path, webgpu_device, vulkan_device
):
    """Deliberately strong rsLoRA adapters (rank 8, alpha 16, A and B ~ N(0, 0.3) on every decoder
    linear: scaling 5.7, deltas ~70x the base weights) on tiny Llama-3, Mistral and Qwen2 models, three
    draws each: the max |logit diff| from transformers + PEFT of each device and setting stays under
    STRONG_BOUNDS. Strong adapters grow the attention scores, where f16 rounding shows; so the f16
    defaults are measured too, not only the f32 settings the other tests use."""
    import torch
    from peft import PeftModel
    from tiny_models import load_hf

    from converters.peft import export_peft

    worst = dict.fromkeys(STRONG_BOUNDS, 0.0)
    for family in STRONG_FAMILIES:
        md = ModelDir(model_dirs[family])
        # 16 positions: within Mistral's sliding window (16 here; past it, llama.cpp's base logits
        # already leave transformers')
        ids = [int(i) for i in np.random.default_rng(3).integers(0, md.config.vocab_size, 16)]
        adapters = {
            f"s{seed}": random_adapter(md, seed, rank=8, alpha=16.0, std=0.3, rslora=True)
            for seed in STRONG_SEEDS
        }
        with torch.no_grad():
            base = load_hf(md.path)(torch.tensor([ids])).logits[0].numpy()
            refs = {}
            for name, adapter in adapters.items():
                folder = export_peft(adapter, tmp_path / family / name)
                peft = PeftModel.from_pretrained(load_hf(md.path), folder)
                refs[name] = peft.eval()(torch.tensor([ids])).logits[0].numpy()
        assert min(np.abs(ref - base).max() for ref in refs.values()) > 0.5  # they really move the logits
        bundle = build_bundle(md.path, tmp_path / family / "bundle", adapters, backends=("onnx", "gguf"))
        names = list(adapters)

        default = vulkan_default_logits(bundle, ids, names, tmp_path / family / "vulkan.npy")
        diffs = {"vulkan_default_base": np.abs(default[0] - base).max()}
        diffs["vulkan_default"] = max(np.abs(default[1 + i] - refs[n]).max() for i, n in enumerate(names))
        for key, backend, quant, device in (
            ("webgpu", "onnx", "fp32", "gpu"),
            ("vulkan_f32", "llamacpp", "f32", "gpu"),
            ("cpu_f32", "llamacpp", "f32", "cpu"),
            ("cpu_default", "llamacpp", "f32", "cpu"),
        ):
            extra = {"precise": key != "cpu_default"} if backend == "llamacpp" else {}
            engine = runtime.load(bundle, backend=backend, quant=quant, device=device, **extra)
            assert engine.info()["device"]["kind"] == device
            for name in names:
                engine.add_adapter(name)
            diffs[key] = max(np.abs(engine.logits(ids, adapters={n: 1.0}) - refs[n]).max() for n in names)
        # the child really ran its f16 shaders: with the same f32 KV cache, its base logits are
        # further from transformers than this process's f32 shaders' by far more than f32 rounding
        f32_shaders = runtime.load(bundle, backend="llamacpp", quant="f32", device="gpu", precise=True)
        f32_base = np.abs(f32_shaders.logits(ids) - base).max()
        f16_base = np.abs(default[1 + len(names)] - base).max()
        assert f16_base > 10 * f32_base, (f16_base, f32_base)
        print(f"{family}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        worst = {k: max(v, diffs[k]) for k, v in worst.items()}
    print("strong adapters, max |logit diff| from PEFT:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert all(worst[k] < bound for k, bound in STRONG_BOUNDS.items()), worst


def greedy(engine, ids, adapters, n=6):
    return engine.generate_ids(ids, SamplingParams(max_new_tokens=n), adapters=adapters)


def test_swaps_on_the_gpu_equal_fresh_engines(bundles, backend):
    bundle = bundles("qwen2")
    quant = BACKENDS[backend][0]
    ids = prompts(bundle)[0]
    engine = open_engine(bundle, backend, quant, "gpu")
    order = [{"a": 1.0}, {"b": 1.0}, {"a": 1.0}, {}]
    swapped = [greedy(engine, ids, s) for s in order]
    fresh = {}
    for s in order:
        key = tuple(s)
        if key not in fresh:
            fresh[key] = greedy(open_engine(bundle, backend, quant, "gpu", adapters=list(s)), ids, s)
    assert swapped == [fresh[tuple(s)] for s in order]
    assert len({tuple(t) for t in swapped}) > 1


def test_stacked_set_on_the_gpu_equals_merged_weights(bundles, backend):
    bundle = bundles("llama")
    quant = BACKENDS[backend][0]
    ids = prompts(bundle)[1]
    engine = open_engine(bundle, backend, quant, "gpu")
    stacked = engine.logits(ids, adapters={"a": 1.0, "b": 0.5})
    engine.merge("a", 1.0)
    engine.merge("b", 0.5)
    assert engine.info()["device"]["kind"] == "gpu"
    assert np.abs(engine.logits(ids, adapters={}) - stacked).max() < 1e-3


def test_eight_threads_on_the_gpu_equal_serial_runs(bundles, backend):
    bundle = bundles("smollm")
    quant = BACKENDS[backend][1]
    engine = open_engine(bundle, backend, quant, "gpu")
    all_ids = prompts(bundle)
    requests = [(all_ids[i % 4], SETS[i % 4]) for i in range(8)]
    serial = [greedy(engine, ids, s) for ids, s in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda r: greedy(engine, *r), requests)) == serial


def test_gpu_without_a_device_is_one_clear_error(bundles, monkeypatch):
    """device='gpu' never falls back to the CPU: it says what is missing."""
    bundle = bundles("qwen2")
    from runtime.llamacpp import lib as llamacpp_lib
    from runtime.onnx import device as onnx_device

    monkeypatch.setattr(llamacpp_lib, "gpu_devices", lambda: [])
    with pytest.raises(EdgeLoraError, match="device='gpu'.*(no GPU device|without a GPU backend)"):
        runtime.load(bundle, backend="llamacpp", quant="f32", device="gpu")
    assert (
        runtime.load(bundle, backend="llamacpp", quant="f32", device="auto").info()["device"]["kind"] == "cpu"
    )
    monkeypatch.setattr(
        onnx_device,
        "_register",
        lambda ort: "ONNX Runtime has no WebGPU provider here: " + onnx_device.NO_PLUGIN,
    )
    with pytest.raises(EdgeLoraError, match="device='gpu'.*pip install onnxruntime-ep-webgpu"):
        runtime.load(bundle, backend="onnx", quant="fp32", device="gpu")
    assert runtime.load(bundle, backend="onnx", quant="fp32", device="auto").info()["device"]["kind"] == "cpu"


def test_auto_never_takes_a_software_gpu(bundles, webgpu_device, vulkan_device):
    bundle = bundles("qwen2")
    for backend, quant in (("onnx", "fp32"), ("llamacpp", "f32")):
        engine = runtime.load(bundle, backend=backend, quant=quant, device="auto")
        expected = "cpu" if {"onnx": webgpu_device, "llamacpp": vulkan_device}[backend].software else "gpu"
        assert engine.info()["device"]["kind"] == expected


# --- ONNX Runtime on WebGPU: placement, residency, bytes per step -------------------------------------


def index_tensors(graph) -> set[str]:
    """Tensors computed from the attention mask, logits_to_keep, shapes and integer constants only:
    the sequence lengths GroupQueryAttention takes on the host, and the slice of the logits."""
    import onnx

    known = {"attention_mask", "logits_to_keep"}
    known |= {
        t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    }
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            inputs = [i for i in node.input if i]
            if node.op_type == "Shape" or node.op_type == "Constant" or all(i in known for i in inputs):
                new = set(node.output) - known
                if new:
                    known |= new
                    changed = True
    return known


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_every_float_node_runs_on_webgpu(bundles, webgpu_device, quant):
    """Node placement, both sessions: the CPU runs only the few integer nodes that turn the mask
    into GroupQueryAttention's host-side sequence lengths (ORT keeps shape math on the CPU by design)."""
    import onnx

    bundle = bundles("qwen2")
    engine = open_engine(bundle, "onnx", quant, "gpu")
    folder = bundle / "onnx" / f"{quant}-fast"
    for session, placement in engine.placement().items():
        graph = onnx.load(
            folder / ("model.plain.onnx" if session == "plain" else "model.onnx"), load_external_data=False
        ).graph
        by_name = {n.name: n for n in graph.node}
        index = index_tensors(graph)
        on_gpu = placement["WebGpuExecutionProvider"]
        on_cpu = placement.get("CPUExecutionProvider", [])
        assert len(on_gpu) > 20 and len(on_cpu) <= 12, (session, on_cpu)
        assert {op for op, _ in on_gpu} >= {
            "MatMul" if quant == "fp32" else "MatMulNBits",
            "GroupQueryAttention",
        }
        for op, name in on_cpu:
            node = by_name.get(name)
            assert node is not None, f"{session}: {op} {name!r} on the CPU is not a node of the file"
            assert all(o in index for o in node.output), (
                f"{session}: {op} {name!r} computes activations on the CPU"
            )


def test_webgpu_decode_keeps_kv_and_adapters_on_the_device(bundles, webgpu_device, tmp_path):
    """An adapter set is uploaded once and dropped when removed; a decode step moves the token and a
    4-byte sequence length in and the logits out (ORT's profile shows every device copy)."""
    bundle = bundles("qwen2")
    engine = runtime.load(bundle, backend="onnx", quant="fp32", device="gpu", profile_dir=tmp_path)
    engine.add_adapter("a")
    engine.add_adapter("b")
    ids = prompts(bundle)[0]
    greedy(engine, ids, {"a": 1.0}, n=2)
    uploads = engine.info()["device"]["uploads"]["lora"]["count"]
    steps = 5
    greedy(engine, ids, {"a": 1.0}, n=steps + 1)  # same set: no upload
    assert engine.info()["device"]["uploads"]["lora"]["count"] == uploads
    greedy(engine, ids, {"a": 1.0, "b": 0.5}, n=2)  # a new set: uploaded once
    after_stack = engine.info()["device"]["uploads"]["lora"]["count"]
    assert after_stack > uploads
    greedy(engine, ids, {"a": 1.0, "b": 0.5}, n=2)
    assert engine.info()["device"]["uploads"]["lora"]["count"] == after_stack
    resident = engine.info()["device"]["resident_lora_bytes"]
    engine.remove_adapter("b")
    assert engine.info()["device"]["resident_lora_bytes"] < resident  # the stacked set's tensors went with b

    profile = [p for p in engine.end_profiling() if p.name.startswith("model_")][0]
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    copies = [
        e
        for e in events
        if e.get("cat") == "Node" and e["name"].startswith("Memcpy") and e["name"].endswith("_kernel_time")
    ]
    assert runs and len(copies) <= len(runs)  # at most one device copy inside the graph per run ...
    assert all(
        int(e["args"]["output_size"]) <= 8 for e in copies
    )  # ... of a sequence length, never KV or LoRA
    session = engine.lora_session
    on_device = {
        i.name for i, m in zip(session.get_inputs(), session.get_input_memory_infos()) if m.name != "Cpu"
    }
    assert (
        "input_ids" in on_device and "attention_mask" not in on_device
    )  # the token is the one feed copied in


GENAI_SCRIPT = """
import json, sys
import onnxruntime_ep_webgpu
import onnxruntime_genai as og

folder, adapter, provider = sys.argv[1], sys.argv[2], sys.argv[3]
prompt, n = json.loads(sys.argv[4]), int(sys.argv[5])
config = og.Config(folder)
if provider != "cpu":
    og.register_execution_provider_library("WebGPU", onnxruntime_ep_webgpu.get_library_path())
    config.clear_providers()
    config.append_provider(provider)
model = og.Model(config)
adapters = og.Adapters(model)
adapters.load(adapter, "a")
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + n, do_sample=False)
generator = og.Generator(model, params)
generator.set_active_adapter(adapters, "a")
generator.append_tokens([prompt])
out = []
while not generator.is_done():
    generator.generate_next_token()
    out.append(int(generator.get_next_tokens()[0]))
print(json.dumps(out))
"""


def genai_greedy(folder: Path, adapter: Path, provider: str, prompt: list[int], n: int = 12) -> list[int]:
    """ORT GenAI in a process of its own, as in an app (it shares ONNX Runtime's environment with
    the onnxruntime module, where the tests registered the same plugin under another name)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", GENAI_SCRIPT, str(folder), str(adapter), provider, json.dumps(prompt), str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(gpu=True),  # the software WebGPU device, on purpose
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_onnxruntime_genai_runs_our_folder_on_webgpu(bundles, webgpu_device, quant):
    """What a mobile app embeds: ORT GenAI with the WebGPU plugin takes our folder and .onnx_adapter
    as they are, and its greedy tokens on the GPU equal its own on the CPU."""
    bundle = bundles("qwen2")
    folder, adapter = bundle / "onnx" / f"{quant}-fast", bundle / "adapters" / "a.onnx_adapter"
    prompt = prompts(bundle)[1]
    on_gpu = genai_greedy(folder, adapter, "webgpu", prompt)
    assert len(on_gpu) == 12
    assert on_gpu == genai_greedy(folder, adapter, "cpu", prompt)
    if quant == "fp32":  # and equal ours (at 4 bits the CPU kernels of the two differ in rounding)
        assert on_gpu == greedy(open_engine(bundle, "onnx", quant, "gpu"), prompt, {"a": 1.0}, n=12)


@pytest.mark.parametrize("backend_name", ["onnx", "llamacpp"])
def test_cli_device_gpu(bundles, backend_name, webgpu_device, vulkan_device):
    """`--device gpu` runs there and says so; on a machine where the runtime finds no GPU (here:
    without the software-device switches), one line says what is missing and the exit code is 2."""
    import os
    import subprocess
    import sys

    bundle = bundles("qwen2")
    cmd = [
        sys.executable,
        "-m",
        "edge_lora",
        "run",
        str(bundle),
        "--backend",
        backend_name,
        "--device",
        "gpu",
        "--prompt",
        "SELECT name",
        "--max-new-tokens",
        "4",
        "--adapter",
        "a",
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env(gpu=True))
    assert done.returncode == 0, done.stderr[-1000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["device"]["kind"] == "gpu" and out["device"]["name"] and out["adapters"] == {"a": 1.0}

    switches = ("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER", "GGML_VK_VISIBLE_DEVICES")
    software = {"onnx": webgpu_device, "llamacpp": vulkan_device}[backend_name].software
    if software:  # a real GPU would still be found without the switches
        env = {k: v for k, v in os.environ.items() if k not in switches}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 2
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "device='gpu'" in lines[0] and "hint:" in lines[0], done.stderr[-800:]


def test_webgpu_kv_cache_grows_on_the_device(tmp_path, webgpu_device):
    """A request that outgrows the first KV block (256 positions) doubles the device buffers and
    carries the cached positions over: its tokens equal the CPU's."""
    from tiny_models import make_model_dir

    model_dir = make_model_dir(tmp_path / "model", "qwen2", max_position_embeddings=1024)
    md = ModelDir(model_dir)
    path = tmp_path / "a.safetensors"
    random_adapter(md, 1, rank=4, alpha=4.0, b_std=0.1, mixed_ranks=1).save(path)
    bundle = export_bundle(
        model_dir,
        tmp_path / "bundle",
        [AdapterSource(path, "a")],
        ExportOptions(backends=["onnx"], onnx_quants=["fp32"]),
        show_progress=False,
    )
    prompt = (prompts(bundle)[0] * 40)[:240]
    gpu, cpu = (
        open_engine(bundle, "onnx", "fp32", "gpu", adapters=("a",)),
        open_engine(bundle, "onnx", "fp32", "cpu", adapters=("a",)),
    )
    params = SamplingParams(
        max_new_tokens=40, repetition_penalty=1.3
    )  # no early eos loop: 240 + 40 positions pass 256
    ours = gpu.generate_ids(prompt, params, adapters={"a": 1.0})
    assert ours == cpu.generate_ids(prompt, params, adapters={"a": 1.0}) and len(ours) + len(prompt) > 256
    assert (
        gpu.info()["device"]["uploads"]["kv"]["count"] == 2 * md.config.num_hidden_layers
    )  # K and V of each layer, once


def test_activated_adapter_on_the_gpu_equals_the_cpu(bundles, backend, tmp_path):
    """An activated adapter (aLoRA) on the GPU: the prompt cut at its invocation, the KV handed from the
    base's segment to the adapter's on the device (ONNX: the device buffers, llama.cpp: one context)."""
    from edge_lora.adapter import Adapter

    bundle = bundles("llama")
    quant = BACKENDS[backend][0]
    ids = prompts(bundle)[2]
    activated = Adapter.load(bundle.parent / "llama-a.safetensors")
    activated.invocation_tokens = ids[5:7]
    activated.save(tmp_path / "x.safetensors")
    engines = {}
    for device in ("gpu", "cpu"):
        engines[device] = open_engine(bundle, backend, quant, device, adapters=("b",))
        engines[device].add_adapter("x", tmp_path / "x.safetensors")
    gpu, cpu = engines["gpu"], engines["cpu"]
    for adapters in ({"x": 1.0}, {"x": 1.0, "b": 0.5}):  # alone, and after an ordinary adapter's segment
        assert np.abs(gpu.logits(ids, adapters=adapters) - cpu.logits(ids, adapters=adapters)).max() < 1e-3
    moved = np.abs(cpu.logits(ids, adapters={"x": 1.0}) - cpu.logits(ids)).max(axis=1)
    assert moved[:5].max() < 1e-5 and moved[5:].max() > 0.05  # the base before the invocation
    assert greedy(gpu, ids, {"x": 1.0}) == greedy(cpu, ids, {"x": 1.0})
