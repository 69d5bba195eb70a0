"""llama.cpp backend benchmark: decode tok/s, prefill, adapter swap latency, cold load to first token.

Random-weight models with real shapes (nothing is downloaded): SmolLM2-135M and Qwen2.5-0.5B.
Cases per quant (q4_0, q8_0): base, one rank-16 all-linear adapter unmerged, two stacked, one merged
at each merge precision (the base's own type, q8_0), with its logits against the unmerged adapter's
and its decode paired with the base's round by round.
Numbers go through LlamaCppEngine (numpy sampling included, as in the ONNX benchmark), plus llama.cpp
alone (raw llama_decode) for the base as the anchor. ``use_extra_bufts`` is the engine's automatic,
fastest safe choice for this CPU (off on Intel AMX, where repacked Q4_0/Q8_0 decoding crashed).

    python -m benchmarks.gguf_bench --quick     # SmolLM2 shape, q4_0, short runs
    python -m benchmarks.gguf_bench            # both shapes, q4_0 and q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.bundle import sha256_file, write_manifest
from edge_lora.model_dir import ModelDir
from edge_lora.safetensors_file import save_tensors
from edge_lora.targets import linear_modules


@dataclass
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    architecture: str = "LlamaForCausalLM"
    rope_theta: float = 10000.0


SHAPES = {
    "smollm2-135m": Shape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, rope_theta=100000.0),
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, "Qwen2ForCausalLM", 1000000.0),
}


def make_random_model(shape: Shape, out: Path, seed: int = 0) -> Path:
    """config.json + fp16 safetensors + a small byte-level BPE tokenizer (the rest of the vocab is
    padding)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out)
    head_dim = shape.hidden // shape.heads
    config = {
        "architectures": [shape.architecture],
        "model_type": "qwen2" if "Qwen2" in shape.architecture else "llama",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": shape.rope_theta,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    (out / "config.json").write_text(json.dumps(config))
    save_tensors(out / "model.safetensors", _random_tensors(shape, head_dim, seed))
    return out


def _write_tokenizer(out: Path) -> None:
    """A byte-level BPE of 300 tokens trained on one sentence, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["edge-lora benchmarks llama.cpp against ONNX Runtime on the device."] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def _random_tensors(shape: Shape, head_dim: int, seed: int) -> dict:
    """The Llama / Qwen2 weights of ``shape``, fp16, normal(0, 0.02); norms at one."""
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": rng.normal(0, 0.02, (shape.vocab, shape.hidden)).astype(np.float16),
        "model.norm.weight": np.ones(shape.hidden, np.float16),
    }
    kv = shape.kv_heads * head_dim
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        dims = {
            "self_attn.q_proj": (shape.heads * head_dim, shape.hidden),
            "self_attn.k_proj": (kv, shape.hidden),
            "self_attn.v_proj": (kv, shape.hidden),
            "self_attn.o_proj": (shape.hidden, shape.heads * head_dim),
            "mlp.gate_proj": (shape.intermediate, shape.hidden),
            "mlp.up_proj": (shape.intermediate, shape.hidden),
            "mlp.down_proj": (shape.hidden, shape.intermediate),
        }
        for m, d in dims.items():
            tensors[p + m + ".weight"] = rng.normal(0, 0.02, d).astype(np.float16)
        if "Qwen2" in shape.architecture:
            for m in ("q_proj", "k_proj", "v_proj"):
                tensors[p + f"self_attn.{m}.bias"] = rng.normal(0, 0.02, dims[f"self_attn.{m}"][0]).astype(
                    np.float16
                )
        tensors[p + "input_layernorm.weight"] = np.ones(shape.hidden, np.float16)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(shape.hidden, np.float16)
    return tensors


def random_adapter(md: ModelDir, seed: int, rank: int = 16) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {
        m: LoraWeights(
            a=rng.normal(0, 0.02, (rank, i)).astype(np.float32),
            b=rng.normal(0, 0.02, (o, rank)).astype(np.float32),
            alpha=2.0 * rank,
        )
        for m, (o, i) in linear_modules(md.config).items()
    }
    return Adapter(modules=modules, base_architecture=md.config.architecture, base_fingerprint=md.fingerprint)


def make_bundle(model_dir: Path, out: Path, quants: list[str]) -> Path:
    from converters.gguf_export import export_gguf
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter

    md = ModelDir(model_dir)
    rels, entries, adapters = ["tokenizer.json"], [], {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes((md.path / "tokenizer.json").read_bytes())
    for q in quants:
        rel = f"gguf/model-{q}.gguf"
        export_gguf(md, out / rel, q)
        entries.append({"quant": q, "model": rel})
        rels.append(rel)
    for name, seed in (("a", 1), ("b", 2)):
        adapter = random_adapter(md, seed)
        src, gg = f"adapters/{name}.safetensors", f"adapters/{name}.gguf"
        adapter.save(out / src)
        export_gguf_adapter(adapter, md.config, out / gg, "f32")
        adapters[name] = {"source": src, "gguf": gg}
        rels += [src, gg]
    write_manifest(
        out,
        {
            "model": md.config.to_dict(),
            "base_fingerprint": md.fingerprint,
            "tokenizer": {"tokenizer": "tokenizer.json"},
            "backends": {"gguf": entries},
            "adapters": adapters,
            "files": {r: {"sha256": sha256_file(out / r)} for r in rels},
        },
    )
    return out


def _decode_rate(engine, prompt, new_tokens, adapters, repeats: int = 3) -> tuple[float, float]:
    """Best (prefill seconds, decode tokens/s) of a few greedy requests: the CPU is shared, best-of is the
    least noisy."""
    runs = [_one_request(engine, prompt, new_tokens, adapters) for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def _one_request(engine, prompt, new_tokens, adapters) -> tuple[float, float]:
    from runtime.sampling import Sampler, SamplingParams

    chosen, loaded = engine._request_set(adapters)
    state = engine._new_state(chosen, loaded)
    engine._forget_cache()  # prefill from an empty cache, as a new conversation would
    if engine._prefixes is not None:  # and no prefix saved under an earlier switch (runtime.prefix_cache)
        engine._prefixes.clear()
    sampler = Sampler(SamplingParams(max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    logits = state.feed(prompt)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = state.feed([sampler(logits, state.history)])
    return prefill, new_tokens / (time.perf_counter() - t1)


def _raw_decode_rate(engine, prompt, new_tokens) -> float:
    """llama.cpp alone: llama_decode one token at a time, no sampling (the anchor)."""
    rates = []
    with engine._ctx_lock:
        ctx = engine._ctx
        engine._use_set({}, {})
        for _ in range(3):
            ctx.clear()
            ctx.decode(prompt, 0)
            t0 = time.perf_counter()
            for i in range(new_tokens):
                ctx.decode([7], len(prompt) + i)
            rates.append(new_tokens / (time.perf_counter() - t0))
        ctx.clear()
        engine._cache_keys, engine._last_state = [], None
    return max(rates)


def _swap_latency(engine, n: int) -> tuple[float, float]:
    """Time of one hot swap (llama_set_adapters_lora A <-> B) plus the next token, in ms."""
    times = []
    with engine._ctx_lock:
        ctx = engine._ctx
        handles = {n_: la.handle.ptr for n_, la in engine._adapters.items()}
        ctx.clear()
        for i in range(n):
            name = "a" if i % 2 else "b"
            t0 = time.perf_counter()
            ctx.set_adapters([handles[name]], [1.0])
            ctx.decode([7], i)
            times.append((time.perf_counter() - t0) * 1e3)
        ctx.set_adapters([], [])
        ctx.clear()
        engine._applied, engine._cache_keys, engine._last_state = (), [], None
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def bench_bundle(
    bundle: Path, quant: str, threads: int, prompt_len: int, new_tokens: int, swaps: int
) -> list[dict]:
    import runtime

    rows = []
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 250, prompt_len)]
    t0 = time.perf_counter()
    engine = runtime.load(bundle, backend="llamacpp", quant=quant, threads=threads, n_ctx=1024)
    engine.add_adapter("a")
    engine.generate_ids(prompt[:8], _params(1), adapters={"a": 1.0})
    cold = time.perf_counter() - t0
    engine.add_adapter("b")
    raw = _raw_decode_rate(engine, prompt, new_tokens)
    for case, adapters in (
        ("base", {}),
        ("1 adapter r16", {"a": 1.0}),
        ("2 stacked r16", {"a": 1.0, "b": 1.0}),
    ):
        engine._use_set(adapters, {n: engine._adapters[n] for n in adapters})  # swap outside the timed region
        prefill, rate = _decode_rate(engine, prompt, new_tokens, adapters)
        rows.append({"case": case, "decode_tok_s": rate, "prefill_ms": prefill * 1e3})
    p50, p99 = _swap_latency(engine, swaps)
    rows[1].update(swap_p50_ms=p50, swap_p99_ms=p99, cold_load_first_token_s=cold)
    rows[0]["raw_llama_decode_tok_s"] = raw
    from benchmarks.gguf_merge import merged_rows

    rows += merged_rows(engine, bundle, quant, threads, prompt, new_tokens, _one_request)
    engine.close()
    return rows


def _params(n):
    from runtime.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n)


def run(quick: bool) -> dict:
    import runtime.llamacpp.lib as lib

    shapes = ["smollm2-135m"] if quick else list(SHAPES)
    quants = ["q4_0"] if quick else ["q4_0", "q8_0"]
    threads = min(2, os.cpu_count() or 1)
    prompt_len, new_tokens, swaps = (64, 32, 40) if quick else (128, 64, 200)
    results = {
        "threads": threads,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "use_extra_bufts": lib.default_extra_bufts(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        for name in shapes:
            model_dir = make_random_model(SHAPES[name], Path(tmp) / name)
            t0 = time.perf_counter()
            bundle = make_bundle(model_dir, Path(tmp) / f"{name}-bundle", quants)
            export_s = time.perf_counter() - t0
            per_quant = {}
            for q in quants:
                per_quant[q] = {
                    "rows": bench_bundle(bundle, q, threads, prompt_len, new_tokens, swaps),
                    "file_mb": (bundle / f"gguf/model-{q}.gguf").stat().st_size / 1e6,
                }
            results["models"][name] = {
                "export_s": export_s,
                "quants": per_quant,
                "adapter_mb": (bundle / "adapters/a.gguf").stat().st_size / 1e6,
            }
    return results


def table(results: dict) -> str:
    lines = [
        "| model | quant | case | decode tok/s | vs base | prefill ms | swap p50/p99 ms "
        "| cold load→1st token s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, info in results["models"].items():
        for q, qi in info["quants"].items():
            base = qi["rows"][0]["decode_tok_s"]
            for r in qi["rows"]:
                swap = f"{r['swap_p50_ms']:.2f} / {r['swap_p99_ms']:.2f}" if "swap_p50_ms" in r else ""
                cold = f"{r['cold_load_first_token_s']:.2f}" if "cold_load_first_token_s" in r else ""
                case = r["case"] + (
                    f" (raw llama_decode {r['raw_llama_decode_tok_s']:.1f})"
                    if "raw_llama_decode_tok_s" in r
                    else ""
                )
                if "merge_s" in r:
                    case += (
                        f" (merge {r['merge_s']:.1f} s; vs unmerged: {r['rel_to_adapter_effect']:.2f} of "
                        f"the adapter's effect, max {r['max_abs_logit_diff']:.3f}, "
                        f"argmax {r['argmax_agree']:.2f})"
                    )
                lines.append(
                    f"| {model} | {q} ({qi['file_mb']:.0f} MB) | {case} | {r['decode_tok_s']:.1f} | "
                    f"{r.get('vs_base_paired', r['decode_tok_s'] / base):.2f} | {r['prefill_ms']:.0f} | "
                    f"{swap} | {cold} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, one quant, short runs")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--memory", type=int, metavar="ROUNDS", help="only the memory levers (SmolLM2 shape, q4_0), in rounds"
    )
    args = parser.parse_args()
    if args.memory:
        from benchmarks.gguf_memory import memory_levers, table

        with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
            model_dir = make_random_model(SHAPES["smollm2-135m"], Path(tmp) / "m")
            out = memory_levers(make_bundle(model_dir, Path(tmp) / "b", ["q4_0"]), "q4_0", args.memory)
        print(table(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return
    results = run(args.quick)
    print(
        f"threads={results['threads']} prompt={results['prompt_tokens']} new={results['new_tokens']} "
        f"use_extra_bufts={results['use_extra_bufts']}"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
