"""The multi-adapter workload's engines (benchmarks.workload_bench), each in its own worker process
(benchmarks.worker, kinds "workload-ours", "workload-llamacpp", "workload-genai"): ours through the
engine's token loop, llama-cpp-python switching its LoRA per request as llama-server does, and ORT GenAI
with a generator per request. Each times its requests from the call to the first and the last token."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator


class _Timed(ABC):
    """A workload engine: ``request(name, ids, n)`` yields its tokens one by one; ``workload`` times
    each request from the call to its first and its last token."""

    @abstractmethod
    def request(self, name: str, ids: list[int], new_tokens: int) -> Iterator[int]:
        """One greedy request under adapter ``name`` alone, its tokens as they come (stops at eos)."""

    def warm(self, warmup: list) -> None:
        for name, ids, n in warmup:
            for _ in self.request(name, list(ids), n):
                pass

    def workload(self, cmd: dict) -> dict:
        rows = []
        for name, ids in cmd["requests"]:
            t0 = time.perf_counter()
            tokens, first = [], None
            for token in self.request(name, list(ids), cmd["new_tokens"]):
                if first is None:
                    first = time.perf_counter()
                tokens.append(int(token))
            end = time.perf_counter()
            rows.append(
                {
                    "adapter": name,
                    "wall_ms": (end - t0) * 1e3,
                    "ttft_ms": ((first or end) - t0) * 1e3,
                    "tokens": tokens,
                }
            )
        return {"requests": rows, **self.stats()}

    def stats(self) -> dict:
        return {}


class OursWorkload(_Timed):
    """edge-lora's engine, its adapters added: a request is ``engine._token_loop`` (generate_ids' loop)."""

    def __init__(self, engine: object):
        from runtime.sampling import SamplingParams

        self.engine, self.params = engine, SamplingParams
        self._seen = self._prefix_stats()

    def request(self, name: str, ids: list[int], new_tokens: int) -> Iterator[int]:
        return self.engine._token_loop(ids, self.params(max_new_tokens=new_tokens), {name: 1.0})

    def _prefix_stats(self) -> dict:
        info = self.engine.info()
        out = dict(info.get("prefix_cache") or {})
        if "evaluated_positions" in info:  # llama.cpp: positions it evaluated (prompts and new tokens)
            out["evaluated_positions"] = info["evaluated_positions"]
        return out

    def stats(self) -> dict:
        """The prefix store over this call: its counters' increase, its bytes and bound now; on llama.cpp
        the positions evaluated over this call (``evaluated_positions``: what its live context and the
        store did not hold)."""
        now = self._prefix_stats()
        keys = ("saved", "hits", "misses", "evicted", "tokens_reused")
        delta = {k: now[k] - self._seen.get(k, 0) for k in keys if k in now}
        out: dict = {}
        if "evaluated_positions" in now:
            out["evaluated_positions"] = now["evaluated_positions"] - self._seen.get("evaluated_positions", 0)
        self._seen = now
        if "max_bytes" not in now:
            return {"prefix_cache": None, **out}
        store = {**delta, "bytes": now.get("bytes"), "max_bytes": now.get("max_bytes")}
        return {"prefix_cache": store, **out}


def load_ours(spec: dict) -> OursWorkload:
    """A worker's engine (kind "workload-ours"): runtime.load with the backend's defaults (plus
    ``engine_options``), the adapters added (a path, or None for the bundle's own), warmed."""
    import runtime

    options = {"quant": spec["quant"], "threads": spec["threads"], **spec.get("engine_options", {})}
    t0 = time.perf_counter()
    engine = runtime.load(spec["bundle"], backend=spec["backend"], **options)
    for name, path in spec["adapters"].items():
        engine.add_adapter(name, path)
    out = OursWorkload(engine)
    out.load_s = time.perf_counter() - t0
    out.warm(spec.get("warmup", []))
    out.stats()  # the warm-up's counters are not the workload's
    return out


class LlamaCppWorkload(_Timed):
    """llama-cpp-python's ``Llama`` on the GGUF with every LoRA loaded once; a request under another set
    than the last one's switches with ``llama_set_adapters_lora`` and clears the KV cache (llama-server's
    rule, see the module's docstring); under the same set ``generate`` reuses the common prefix."""

    def __init__(self, spec: dict):
        import ctypes

        import llama_cpp

        from benchmarks.peers import LlamaCppPeer

        t0 = time.perf_counter()
        self.llm = LlamaCppPeer({**spec, "lora": None}).llm  # the decode rows' peer settings
        self.capi, self.ctypes = llama_cpp, ctypes
        from llama_cpp._utils import suppress_stdout_stderr

        self.loras = {}
        for name, path in spec["loras"].items():
            # it logs a line per tensor to stderr (as Llama's own lora_path load, kept quiet the same way):
            # 22 KB an adapter, which would fill the worker's stderr pipe
            with suppress_stdout_stderr(disable=False):
                handle = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
            if not handle:
                raise RuntimeError(f"{path}: llama.cpp could not load this LoRA (hint: re-export it)")
            self.llm._stack.callback(llama_cpp.llama_adapter_lora_free, handle)
            self.loras[name] = handle
        self.active: str | None = None
        self.eos = set(spec["eos"])
        self.load_s = time.perf_counter() - t0
        self.warm(spec.get("warmup", []))

    def _switch(self, name: str) -> None:
        capi = self.capi
        adapters = (capi.llama_adapter_lora_p_ctypes * 1)(self.loras[name])
        scales = (self.ctypes.c_float * 1)(1.0)
        if capi.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, scales):
            raise RuntimeError(f"llama_set_adapters_lora failed for {name!r}")
        self.llm.reset()  # no cached tokens: the next generate evaluates its whole prompt
        capi.llama_memory_clear(capi.llama_get_memory(self.llm._ctx.ctx), False)
        self.active = name

    def request(self, name: str, ids: list[int], new_tokens: int) -> Iterator[int]:
        if name != self.active:
            self._switch(name)
        stream = self.llm.generate(
            ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        )
        try:
            for _ in range(new_tokens):
                token = next(stream)
                if token in self.eos:
                    return
                yield token
        finally:
            stream.close()


class GenAIWorkload(_Timed):
    """onnxruntime-genai on our ONNX folder, every ``.onnx_adapter`` in one ``og.Adapters``; a request is
    a new generator with its adapter active (the prompt evaluated whole)."""

    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        from benchmarks.peers import GenAIPeer

        t0 = time.perf_counter()
        self.og = og
        self.model = GenAIPeer({**spec, "adapter": None}).model  # the decode rows' peer settings
        self.adapters = og.Adapters(self.model)
        for name, path in spec["onnx_adapters"].items():
            self.adapters.load(str(path), name)
        self.eos = set(spec["eos"])
        self.load_s = time.perf_counter() - t0
        self.warm(spec.get("warmup", []))

    def request(self, name: str, ids: list[int], new_tokens: int) -> Iterator[int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        gen = og.Generator(self.model, params)
        try:
            gen.set_active_adapter(self.adapters, name)
            gen.append_tokens(ids)  # runs the prompt; the next call picks from its logits
            for i in range(new_tokens):
                if i and gen.is_done():
                    return
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
                if token in self.eos:
                    return
                yield token
        finally:
            del gen


def make(spec: dict) -> _Timed:
    """benchmarks.worker's engine for a "workload-*" kind."""
    kinds = {
        "workload-ours": load_ours,
        "workload-llamacpp": LlamaCppWorkload,
        "workload-genai": GenAIWorkload,
    }
    return kinds[spec["kind"]](spec)
