"""The multi-adapter workload (issue 33): one system prompt, three adapters taking turns on it.

    python -m benchmarks.workload_bench [--quick] [--shape S] [--rounds N] [--json PATH]
    (and a section of python -m benchmarks: results["models"][shape]["workload"], the Summary's
    "<shape>: workload" table and its two targets)

The app this project exists for: one system prompt (512 tokens; 128 in the quick run), then requests
that take turns between three rank-16 all-linear adapters ("a", "b" from the bundle, "c" made here),
each with a short user turn of its own after the shared system prompt (16 tokens, distinct per request),
greedy, 64 new tokens each (16 in the quick run), 12 requests (6). Every engine gets the same requests
in the same order, each in its own worker process (benchmarks.worker), the engines' order rotated per
round; each round has a system prompt of its own (a new app session: nothing of an earlier round is
reused). Before the first round each engine runs one request of the workload's full length and one
short one per adapter on unrelated tokens (graphs built, buffers grown), untimed.

    edge-lora onnx / llama.cpp   runtime.load(bundle, backend=...) with its default settings (the
                                 prefix store on, runtime/prefix_cache.py), add_adapter x3, then
                                 engine._token_loop (what generate / generate_ids run) per request
                                 with adapters={name: 1.0}: a request under an adapter whose system
                                 prompt is in the store restores it instead of evaluating it again.
                                 Where the default store cannot hold the workload's prefixes
                                 (``store_bytes``), one more row with a store that can, as an app
                                 would set it (prefix_cache_bytes).
    llama.cpp                    llama-cpp-python's ``Llama`` on the same GGUF (the decode rows' settings:
                                 flash attention, extra buffer types where the CPU allows), the three
                                 GGUF LoRAs loaded once (``llama_adapter_lora_init``) and switched per
                                 request with ``llama_set_adapters_lora``; at a switch its KV cache is
                                 cleared, as llama-server clears a slot's cached prompt when a request's
                                 LoRA set differs from the slot's last one (``launch_slot_with_task``,
                                 ``lora_should_clear_cache``: kept only for activated LoRAs); under an
                                 unchanged set ``Llama.generate`` reuses the longest common prefix, as
                                 the server's prompt cache does.
    ORT GenAI                    onnxruntime-genai on our exported ONNX folder with the three
                                 ``.onnx_adapter`` files in one ``og.Adapters``: one generator per request
                                 (``set_active_adapter`` takes one adapter per generator), so every
                                 request evaluates the whole prompt.
    edge-lora ..., activated     ours on each backend again, default settings, with the same three
    adapters (aLoRA)             adapters' weights made activated (``invocation_tokens``: ``INVOCATIONS``,
                                 two base ids of their own per adapter; written as adapter files for the
                                 run and added by path) and each request's prompt followed by its
                                 adapter's invocation: the system prompt and user turn are the base's, so
                                 every adapter's request reuses the base's KV of the system prompt (on
                                 llama.cpp in the live context, keyed per position; on ONNX Runtime from
                                 the prefix store under the base set, which the default store holds).
                                 Their ratios are to the best peer of the ordinary workload in the same
                                 round: the peer rows are the ordinary ones (llama-server keeps a slot's
                                 cache across aLoRA switches, but llama-cpp-python's API has no activated
                                 adapters, and ORT GenAI has none). Their target lines are informative,
                                 apart from the ordinary rows' targets.

Per request: wall time (the call to its last token) and time to the first token. Every request follows
a switch (the adapters take turns); each adapter's first request of a round finds nothing of the system
prompt under its set, so time to first token is reported for the others ("after a switch", the target's)
and for those first ones apart. Time per request is over all requests. Ratios are the best peer's time
over ours, paired per round (median). Greedy tokens of ours are compared with the peer on the same file
(llama.cpp on the GGUF, ORT GenAI on the ONNX folder): the share of requests whose first token agrees,
and whose tokens all agree; reported, not asserted (random weights have near ties).

This module makes the requests, the files and the workers; the engines are benchmarks.workload_engines,
the numbers (medians, ratios, targets, the table) benchmarks.workload_report.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import pool
from benchmarks.workload_report import ALORA, OURS, fmt, markdown, mean_ms, summarize, targets

ADAPTERS = ("a", "b", "c")
USER_TOKENS = 16  # each request's own user turn after the system prompt
ID_LOW, ID_HIGH = 3, 250  # random prompt ids, as benchmarks.probes.prompt_ids draws them
# each adapter's invocation when made activated: base ids that neither the rounds' prompts (ID_LOW..ID_HIGH)
# nor the warm-up's (ID_HIGH..ID_HIGH + 40) draw, distinct per adapter
INVOCATIONS = {"a": (290, 291), "b": (292, 293), "c": (294, 295)}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the workload ------------------------------------------------------------------------------


@dataclass
class Workload:
    """What one round asks: a system prompt of ``system`` tokens, ``requests`` requests taking turns
    between ``adapters``, each ``system + its own user turn``, ``new_tokens`` greedy tokens each."""

    system: int
    requests: int
    new_tokens: int
    adapters: tuple[str, ...] = ADAPTERS
    user: int = USER_TOKENS

    def round(self, index: int, invocations: dict | None = None) -> list[tuple[str, list[int]]]:
        """Round ``index``'s requests: (adapter, prompt ids); a system prompt of its own per round. With
        ``invocations`` (adapter -> ids) each prompt ends with its adapter's (activated adapters)."""
        rng = np.random.default_rng(1000 + index)
        system = [int(t) for t in rng.integers(ID_LOW, ID_HIGH, self.system)]
        out = []
        for i in range(self.requests):
            name = self.adapters[i % len(self.adapters)]
            ids = system + [int(t) for t in rng.integers(ID_LOW, ID_HIGH, self.user)]
            out.append((name, ids + _invocation(invocations, name)))
        return out

    @property
    def positions(self) -> int:
        """The most KV positions one request holds."""
        return self.system + self.user + self.new_tokens + 1

    def warmup(self, invocations: dict | None = None) -> list[tuple[str, list[int], int]]:
        """Untimed, before the first round: one request of the workload's full length (contexts grown,
        graphs built for its prompt size), then a short one per adapter; ids the rounds' prompts never
        start with (each followed by its adapter's invocation, given ``invocations``)."""
        rng = np.random.default_rng(7)
        ids = [int(t) for t in rng.integers(ID_HIGH, ID_HIGH + 40, self.system + self.user)]
        first = self.adapters[0]
        return [(first, ids + _invocation(invocations, first), self.new_tokens)] + [
            (n, ids[:8] + _invocation(invocations, n), 2) for n in self.adapters
        ]


def _invocation(invocations: dict | None, name: str) -> list[int]:
    return [int(t) for t in (invocations or {}).get(name, ())]


def first_of_adapter(requests: list[tuple[str, list[int]]]) -> list[bool]:
    """Whether each request is the first of its adapter in the round (nothing of it to restore)."""
    seen: set[str] = set()
    out = []
    for name, _ in requests:
        out.append(name not in seen)
        seen.add(name)
    return out


# --- the files and workers of one model ---------------------------------------------------------


@dataclass
class Files:
    """The bundle and each adapter's files: ``safetensors`` None = the bundle's own (ours add it by name)."""

    bundle: Path
    onnx_quant: str
    gguf_quant: str
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> {"safetensors", "gguf", "onnx_adapter"}

    @property
    def gguf(self) -> Path:
        return self.bundle / "gguf" / f"model-{self.gguf_quant}.gguf"

    @property
    def onnx_folder(self) -> Path:
        return self.bundle / "onnx" / f"{self.onnx_quant}-fast"

    @classmethod
    def from_bundle(cls, bundle: Path, onnx_quant: str, gguf_quant: str, names: tuple[str, ...]) -> Files:
        """Every adapter shipped by the bundle (its .gguf and .onnx_adapter beside its .safetensors)."""
        bundle = Path(bundle)
        adapters = {
            n: {
                "safetensors": None,
                "gguf": bundle / "adapters" / f"{n}.gguf",
                "onnx_adapter": bundle / "adapters" / f"{n}.onnx_adapter",
            }
            for n in names
        }
        return cls(bundle, onnx_quant, gguf_quant, adapters)


def model_files(model: object, onnx_quant: str, gguf_quant: str) -> Files:
    """The benchmark model's files: adapters "a" and "b" from its bundle, and a third, "c" (rank 16, seed
    3, as models.ADAPTERS seeds a and b), made here once as our .safetensors and exported beside it as
    the GGUF LoRA and .onnx_adapter the peers read (cached per exporter version)."""
    from benchmarks.models import RANK, exporters_digest, extra_adapter
    from converters.onnx_adapter import export_onnx_adapter
    from edge_lora.adapter import Adapter
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
    from edge_lora.model_dir import ModelDir

    files = Files.from_bundle(model.bundle, onnx_quant, gguf_quant, ("a", "b"))
    source = extra_adapter(model, "workload-c", RANK, 3)
    folder = model.root / "workload"
    gguf, onnx = folder / f"c-{exporters_digest()}.gguf", folder / f"c-{exporters_digest()}.onnx_adapter"
    if not gguf.is_file() or not onnx.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        config = ModelDir(model.hf_dir).config
        adapter = Adapter.load(source, base=config)
        export_gguf_adapter(adapter, config, gguf)
        export_onnx_adapter(adapter, config, onnx)
    files.adapters["c"] = {"safetensors": source, "gguf": gguf, "onnx_adapter": onnx}
    return files


def activated_files(files: Files, config: object, folder: Path) -> dict[str, Path]:
    """Each adapter's weights made activated (``INVOCATIONS``), written as our adapter file in ``folder``
    (the bundle's own read from the bundle), for ours to add by path; the weights' dtype kept."""
    from dataclasses import replace

    from edge_lora.adapter import Adapter
    from edge_lora.bundle import Bundle

    bundle, out = None, {}
    for name, f in files.adapters.items():
        source = f["safetensors"]
        if source is None:
            bundle = bundle or Bundle.open(files.bundle)
            entry = bundle.adapters.get(name)
            if entry is None:
                raise RuntimeError(f"{files.bundle}: the bundle has no adapter {name!r} (hint: re-export it)")
            source = bundle.require(entry["source"])
        adapter = Adapter.load(source, base=config)
        activated = replace(adapter, invocation_tokens=_invocation(INVOCATIONS, name))
        path = Path(folder) / f"{name}-activated.safetensors"
        activated.save(path, dtype=next(iter(adapter.modules.values())).a.dtype)
        out[name] = path
    return out


def kv_bytes_per_position(config: object, backend: str) -> int:
    """One position's KV cache as each backend's prefix store keeps it: float32 on ONNX Runtime's CPU
    path, llama.cpp's default f16."""
    per = config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    return per * (4 if backend == "onnx" else 2)


def store_states(backend: str, adapters: int) -> int:
    """How many requests' states the prefix store must hold so that each adapter's next turn still finds
    its system prompt there, least recently used out. ONNX Runtime: every request leaves its state in the
    store, which replaces the earlier state of its set on the same prompt (runtime.prefix_cache keeps one
    copy of a shared prompt per set): n (the store's LRU replayed on the workload's pattern). llama.cpp:
    the running request's KV stays in the context until the next switch saves it: n + 1 (measured on
    SmolLM2-135M's shape: 4 states held, every later request served)."""
    return adapters if backend == "onnx" else adapters + 1


def store_bytes(config: object, backend: str, workload: Workload) -> int:
    """A prefix store that holds the workload's prefixes (``store_states`` requests' states of its
    longest request), rounded up to 8 MiB."""
    states = store_states(backend, len(workload.adapters))
    need = states * workload.positions * kv_bytes_per_position(config, backend)
    return -(-need // (8 << 20)) * (8 << 20)


def default_store_bytes(backend: str) -> int:
    """The backend's default prefix store bound (runtime.onnx.backend / runtime.llamacpp.backend)."""
    if backend == "onnx":
        from runtime.onnx.backend import DEFAULT_PREFIX_CACHE_BYTES
    else:
        from runtime.llamacpp.backend import DEFAULT_PREFIX_CACHE_BYTES
    return DEFAULT_PREFIX_CACHE_BYTES


def workers(
    files: Files, workload: Workload, threads: int, config: object, activated: dict | None = None
) -> list[pool.Worker]:
    """Ours on each backend (defaults; and a store sized for the workload where the default is smaller;
    given ``activated``, adapter -> the activated adapter file, ours with them, defaults), then the two
    peers."""
    common = {"threads": threads, "prompt": 8, "new_tokens": 1, "warmup": workload.warmup()}
    eos = list(config.eos_token_id)
    ours = {
        "kind": "workload-ours",
        "bundle": str(files.bundle),
        "adapters": {
            n: (str(f["safetensors"]) if f["safetensors"] else None) for n, f in files.adapters.items()
        },
        **common,
    }
    out = []
    for backend, engine, quant in (
        ("onnx", "onnx", files.onnx_quant),
        ("llamacpp", "llama.cpp", files.gguf_quant),
    ):
        spec = {**ours, "backend": backend, "quant": quant}
        out.append(pool.Worker(f"{OURS} {engine} {quant}", spec, ["workload"]))
        sized = store_bytes(config, backend, workload)
        if sized > default_store_bytes(backend):
            options = {"prefix_cache_bytes": sized}
            label = f"{OURS} {engine} {quant}, prefix store {sized >> 20} MiB"
            out.append(pool.Worker(label, {**spec, "engine_options": options}, ["workload"]))
        if activated:
            alora = {
                **spec,
                "adapters": {n: str(p) for n, p in activated.items()},
                "invocations": {n: list(INVOCATIONS[n]) for n in activated},
                "warmup": workload.warmup(INVOCATIONS),
            }
            out.append(pool.Worker(f"{OURS} {engine} {quant}, {ALORA}", alora, ["workload"]))
    loras = {n: str(f["gguf"]) for n, f in files.adapters.items()}
    out.append(
        pool.Worker(
            f"llama.cpp {files.gguf_quant}",
            {"kind": "workload-llamacpp", "gguf": str(files.gguf), "loras": loras, "eos": eos, **common},
            ["workload"],
        )
    )
    onnx_adapters = {n: str(f["onnx_adapter"]) for n, f in files.adapters.items()}
    out.append(
        pool.Worker(
            f"ORT GenAI on our {files.onnx_quant}",
            {
                "kind": "workload-genai",
                "folder": str(files.onnx_folder),
                "onnx_adapters": onnx_adapters,
                "eos": eos,
                **common,
            },
            ["workload"],
        )
    )
    return out


# --- the section ------------------------------------------------------------------------------------


def run(
    files: Files, workload: Workload, threads: int, rounds: int, say: Callable[[str], None] = say
) -> dict:
    """Every engine through ``rounds`` rounds of the workload; the rows, medians, ratios and agreement."""
    from edge_lora.bundle import Bundle

    config = Bundle.open(files.bundle).config
    started = time.time()
    scratch = tempfile.TemporaryDirectory(prefix="workload-alora-")  # the activated adapter files
    planned = workers(files, workload, threads, config, activated_files(files, config, Path(scratch.name)))
    alive = pool.start_all(planned, say)
    runs: dict[str, list] = {w.label: [] for w in planned}
    try:
        for r in range(rounds):
            shift = r % max(1, len(alive))
            for w in alive[shift:] + alive[:shift]:
                requests = workload.round(r, w.spec.get("invocations"))
                out = w.ask("workload", requests=requests, new_tokens=workload.new_tokens)
                if "error" in out:
                    say(f"  workload {w.label}: {out['error']}")
                runs[w.label].append(out)
            say(
                f"  workload round {r + 1}/{rounds}: "
                + ", ".join(
                    f"{label.replace(OURS + ' ', 'ours ')} {mean_ms(x[-1], 'wall_ms'):.0f} ms"
                    for label, x in runs.items()
                    if x and "requests" in x[-1]
                )
            )
        errors = {w.label: w.info.get("error") for w in planned if w.info.get("error")}
    finally:
        for w in alive:
            w.stop()
        scratch.cleanup()
    firsts = first_of_adapter(workload.round(0))
    return summarize(
        {
            "system": workload.system,
            "user": workload.user,
            "requests": workload.requests,
            "new_tokens": workload.new_tokens,
            "adapters": list(workload.adapters),
            "invocations": {n: list(INVOCATIONS[n]) for n in workload.adapters},
            "rounds": rounds,
            "threads": threads,
            "onnx_quant": files.onnx_quant,
            "gguf_quant": files.gguf_quant,
            "first_of_adapter": firsts,
            "engines": {label: {"rounds": x, "load_s": _load_s(planned, label)} for label, x in runs.items()},
            "errors": errors,
            "wall_s": time.time() - started,
        }
    )


def _load_s(planned: list[pool.Worker], label: str) -> float | None:
    return next((w.info.get("load_s") for w in planned if w.label == label), None)


# --- the runner's entry points ----------------------------------------------------------------------


def plan_workload(plan: object) -> Workload:
    """The plan's workload (benchmarks.plan.Plan: workload_system, _requests, _new_tokens)."""
    return Workload(plan.workload_system, plan.workload_requests, plan.workload_new_tokens)


def run_for_model(plan: object, model: object, say: Callable[[str], None] = say) -> dict:
    """The section on one benchmark model (4-bit: its first ONNX and GGUF quants)."""
    files = model_files(model, plan.onnx_quants[0], plan.gguf_quants[0])
    return run(files, plan_workload(plan), plan.threads, plan.workload_rounds, say=say)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.workload_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="the CI form's sizes (128-token system prompt, 6 x 16)"
    )
    parser.add_argument("--shape", default="smollm2-135m", help="smollm2-135m or qwen2.5-0.5b")
    parser.add_argument("--rounds", type=int, help="rounds (default: the plan's)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    from benchmarks import models
    from benchmarks.plan import Plan

    plan = Plan.make(args.quick, [args.shape])
    if args.rounds:
        plan.workload_rounds = args.rounds
    # only the 4-bit files it runs: a cached bundle of the quick run serves the full sizes too
    model = models.prepare(args.shape, {"onnx": plan.onnx_quants[:1], "gguf": plan.gguf_quants[:1]}, say)
    out = run_for_model(plan, model)
    print("\n".join(markdown(args.shape, out)))
    for t in targets(out):
        print(f"{t['target']}: {fmt(t['value'], 2)} (goal {t['goal']}, {'met' if t['met'] else 'not met'})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
