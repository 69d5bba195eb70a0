"""The ONNX Runtime backend: one exported decoder, adapters as feeds of its LoRA slots.

The engine owns three parts, each holding its own state:

- the sessions: on the CPU's fast variant :class:`~runtime.onnx.cpu_sessions.CpuSessions` (ONNX
  Runtime's C API): ``model.plain.onnx`` for base-only requests and ``model.onnx`` (a LoRA side path
  on every linear layer) for the others, both over ONE copy of the weights (shared initializers, one
  prepacked-weights container), so base requests run at the plain graph's speed after adapters were
  added. Elsewhere (the GPU, other providers, the portable variant)
  :class:`~runtime.onnx.sessions.PythonSessions` (the Python binding), where each session is a
  copy of the weights: on the CPU the plain session is then kept only until the first adapter.
- the adapter sets (:class:`~runtime.onnx.adapter_sets.AdapterSets`): a set becomes one dict of
  LoRA feeds (ranks concatenated, scales folded into B), built once and cached, so a swap between
  requests is a lookup; each request carries its own, so concurrent requests do not disturb each other.
- the decode states, one per request (:class:`~runtime.onnx.cpu_state.CpuKVState` on the CPU,
  :mod:`runtime.onnx.decode_states` on the Python binding), reading the engine's fixed facts from
  one :class:`~runtime.onnx.request.DecodeSetup`.

``merge`` dequantizes, adds and requantizes the touched weights
(:class:`~edge_lora.onnx_format.weight_store.WeightStore`) and reopens the sessions over them: zero
per-token cost afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format import names
from edge_lora.onnx_format.layout import read_layout
from edge_lora.onnx_format.weight_store import WeightStore
from runtime.devices import CPU, check_device
from runtime.engine import DecodeState, Engine, LoadedAdapter
from runtime.mapped_pages import release_pages
from runtime.onnx.adapter_sets import AdapterSets
from runtime.onnx.cpu_sessions import CpuSessions
from runtime.onnx.cpu_state import CpuKVState
from runtime.onnx.decode_states import OnnxState, SharedKVState
from runtime.onnx.device import WEBGPU, DeviceTensors, find_webgpu
from runtime.onnx.request import DecodeSetup
from runtime.onnx.sessions import DEVICE_PROVIDERS, Background, PythonSessions, SessionSpec, resolve_providers
from runtime.onnx.specialised import DEFAULT_CAPACITY as DEFAULT_SPECIALISED
from runtime.prefix_cache import PrefixCache, PrefixReuse

__all__ = ["OnnxEngine", "resolve_providers"]
SESSION_APIS = ("auto", "c", "python")
# KV prefixes left by requests (runtime/prefix_cache.py): float32 KV of SmolLM2-135M is 46 KB a position,
# so 96 MiB hold ~2,100 positions, e.g. a 512-token system prompt under three sets (a request's state
# replaces its set's earlier one on the same prompt); every request leaves its KV there, so the store
# fills as sets take turns: the bound is what it may cost (32 MiB held one set's: the workload row's
# default ONNX engine found no prefix at all)
DEFAULT_PREFIX_CACHE_BYTES = 96 << 20


class OnnxEngine(Engine):
    """A bundle's ONNX model on ONNX Runtime.

    ``spin=True`` (ONNX Runtime's default) lets idle intra-op threads spin for the next op: the
    fastest decode on a CPU the engine has to itself. ``spin=False`` puts them to sleep instead,
    the choice for a CPU shared with other busy processes (spinning threads then fight them for
    cores) or for a battery.
    """

    backend_name = "onnx"

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        quant: str | None = None,
        variant: str | None = None,
        provider: str | list[str] = "cpu",
        threads: int | None = None,
        verify_hashes: bool = True,
        plain_session: bool | None = None,
        spin: bool = True,
        trusted_keys: object = None,
        device: str = "cpu",
        profile_dir: str | os.PathLike | None = None,
        session_api: str = "auto",
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        specialise: int = DEFAULT_SPECIALISED,
    ) -> None:
        """``device="gpu"`` runs on ONNX Runtime's WebGPU provider with the KV cache and the LoRA
        feeds resident on the device (``auto``: a hardware GPU if there is one, else the CPU);
        ``provider`` names other execution providers (xnnpack, coreml, nnapi, ...) for the CPU path.
        ``profile_dir``: ONNX Runtime's per-node profile of every session, written there by
        :meth:`end_profiling`. ``plain_session``: ``None`` (default) or ``True`` keep the plain graph
        for base-only requests (on the CPU's C API path at no second copy of the weights; on the
        Python binding's CPU path, ``None`` keeps it only until the first adapter); ``False``: the
        LoRA graph alone. ``session_api``: ``"auto"`` takes the C API for the CPU's fast variant and
        the Python binding elsewhere; ``"python"`` forces the binding (to compare).
        ``prefix_cache_bytes``: on the CPU, each request leaves its KV cache in a bounded store
        (:mod:`runtime.prefix_cache`) and a later one under the same set starts from the longest prefix
        it shares with one there (a system prompt is evaluated once per set, not once per request);
        0 turns it off. ``specialise``: on the C API path, how many adapter-set shapes (the LoRA groups
        a set feeds) get a graph cut to them (:mod:`runtime.onnx.specialised`), built in the background
        on the first request of that shape and taken by its requests once ready (least recently used
        out): fewer nodes a token (a q/v adapter's extra cost per token +16% -> +8% on SmolLM2-135M), the
        same logits bit for bit, but ~40 MB more peak memory while it is built and a build's CPU time
        beside the first requests, hence 0, off, by default."""
        super().__init__(bundle, verify_hashes=verify_hashes, trusted_keys=trusted_keys)
        self._prefixes = PrefixCache(int(prefix_cache_bytes)) if prefix_cache_bytes > 0 else None
        if session_api not in SESSION_APIS:
            raise EdgeLoraError(
                f"unknown session_api {session_api!r}", hint=f"choose {', '.join(SESSION_APIS)}"
            )
        self.device, ep_device = self._choose_device(device, provider)
        variant = self._default_variant(variant, ep_device)
        spec, data_check = self._locate_files(quant, variant, plain_session, ep_device)
        gpu = spec.gpu
        if gpu and self.layout["variant"] != "fast":
            raise EdgeLoraError(
                f"the {self.layout['variant']} ONNX variant does not run on the GPU path",
                path=self.model_path,
                hint="export the fast variant (--onnx-variant fast) or run on device='cpu'",
            )
        spec.providers = [WEBGPU, "CPUExecutionProvider"] if gpu else resolve_providers(provider)
        spec.threads, spec.spin = threads, spin
        spec.profile_dir = Path(profile_dir) if profile_dir else None
        if spec.profile_dir:
            spec.profile_dir.mkdir(parents=True, exist_ok=True)
        self.gpu = gpu
        fast = self.layout["variant"] == "fast"
        cpu_only = spec.providers == ["CPUExecutionProvider"] and not gpu
        self.session_api = "c" if session_api == "auto" and fast and cpu_only else session_api
        if self.session_api == "c" and not (fast and cpu_only):
            raise EdgeLoraError(
                "session_api='c' runs the fast variant on the CPU provider only",
                hint="use session_api='auto'",
            )
        self.shared_kv = fast and (gpu is not None or not DEVICE_PROVIDERS & set(spec.providers))
        self.weights = WeightStore(self.layout, self.data_path)
        try:
            if self.session_api == "c":
                self.sessions = CpuSessions(spec, plain_session, specialise)
            else:
                self.sessions = PythonSessions(spec, plain_until_adapter=plain_session is None and not gpu)
            self.sessions.open(adapters_loaded=False)
        finally:
            data_check.result()  # a mismatch raises here, and wins over a load error it may explain
        self.adapter_sets = AdapterSets(
            self.config, self.layout, self.sessions, self.weights, self.added_vocab, gpu
        )
        self.decode_setup = DecodeSetup(self.config, self.model_path, self.max_context, self.sessions, gpu)
        if not gpu:  # nothing else runs yet: DONTNEED is safe too where the kernel lacks PAGEOUT
            release_pages(self.data_path, quiet=True)

    # --- construction -----------------------------------------------------------------

    def _choose_device(self, device: str, provider: str | list[str]) -> tuple[object, object | None]:
        """The engine's device, and the WebGPU provider's device to run on (None for the CPU path)."""
        if check_device(device) == "cpu":
            return CPU, None
        if provider not in ("cpu", ["cpu"]):
            raise EdgeLoraError(
                f"device={device!r} and provider={provider!r} both choose where to run",
                hint="give one: device='gpu' is ONNX Runtime's WebGPU provider",
            )
        import onnxruntime as ort

        return find_webgpu(ort, device)

    def _default_variant(self, variant: str | None, ep_device: object | None) -> str | None:
        # the GPU runs the fast variant (its contrib ops have WebGPU kernels); the portable one is for
        # NNAPI/CoreML/XNNPACK
        if (
            ep_device is not None
            and variant is None
            and any(e.get("variant") == "fast" for e in self.bundle.backends.get("onnx") or [])
        ):
            return "fast"
        return variant

    def _locate_files(
        self, quant: str | None, variant: str | None, plain_session: bool | None, ep_device: object | None
    ) -> tuple[SessionSpec, Background]:
        """The model, its layout and the plain model, checked; the weights file's check, started."""
        self.entry = self.bundle.backend_entry("onnx", quant, variant)
        model_rel = self.entry["model"]
        folder = model_rel.rsplit("/", 1)[0] + "/" if "/" in model_rel else ""
        self.model_path = self._checked(model_rel)
        self.layout = read_layout(self._checked(folder + names.LAYOUT_FILE))
        # the weights file (most of the bundle's bytes) is hashed on a thread while ONNX Runtime
        # loads it, not before: the engine is refused before it returns if the hash does not match
        data_rel = folder + self.layout["data_file"]
        self.data_path = self.bundle.require(data_rel)
        data_check = Background(lambda: self._checked(data_rel))
        data_check.start()
        plain = self.layout.get("plain_model")
        plain_path = self._checked(folder + plain) if plain and plain_session is not False else None
        gpu = None
        if ep_device is not None:
            import onnxruntime as ort

            gpu = DeviceTensors(ort, ep_device)
        spec = SessionSpec(
            self.model_path, plain_path, self.data_path, self.layout, [], gpu=gpu, ep_device=ep_device
        )
        return spec, data_check

    def _checked(self, rel: str) -> Path:
        return self.bundle.verify_file(rel) if self.verify_hashes else self.bundle.require(rel)

    # --- the parts' faces ---------------------------------------------------------------

    def wait_specialised(self) -> None:
        """Until the specialised session being built (if any) is ready: for tests and benchmarks that
        measure the state an app reaches after a set's first request."""
        if self.session_api == "c":
            self.sessions.specialised.wait()

    def prepare_for_adapters(self) -> None:
        """Open the LoRA session now and wait for it, so that the first request with an adapter does
        not (an app calls it at startup, off the request path)."""
        self.sessions.start_lora()
        self.sessions.lora  # noqa: B018 (waits for the load, re-raising its error)

    @property
    def providers(self) -> list[str]:
        return self.sessions.spec.providers

    @property
    def plain_session(self) -> object:
        return self.sessions.plain

    @property
    def lora_session(self) -> object:
        return self.sessions.lora

    def placement(self) -> dict[str, dict[str, list[tuple[str, str]]]]:
        """Which provider runs each node, per session (GPU path only):
        ``{session: {provider: [(op, node)]}}``."""
        return self.sessions.placement()

    def end_profiling(self) -> list[Path]:
        """Write the profiles of the sessions opened with ``profile_dir`` and return their paths."""
        return self.sessions.end_profiling()

    # --- engine hooks -------------------------------------------------------------------

    def _attach(self, name: str, adapter: object, source: Path) -> object:
        return self.adapter_sets.attach(name, adapter, source)

    def _detach(self, name: str, handle: object) -> None:
        self.adapter_sets.detach(name)
        if self._prefixes is not None:  # states computed with it: never restored again
            self._prefixes.drop(lambda entry: id(handle) in entry[0][1])

    def _new_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState:
        choice = self.adapter_sets.choice(adapter_set, loaded)
        if self.session_api == "c":
            return CpuKVState(self.decode_setup, choice)
        return (SharedKVState if self.shared_kv else OnnxState)(self.decode_setup, choice)

    def _request_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState:
        state = self._new_state(adapter_set, loaded)
        if self._prefixes is None or not getattr(state, "host_kv", False):
            return state
        names = sorted(adapter_set)
        key = (tuple((n, adapter_set[n]) for n in names), tuple(id(loaded[n].handle) for n in names))
        return PrefixReuse(state, self._prefixes, key)

    def _full_logits(
        self, ids: list[int], adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]
    ) -> np.ndarray:
        state = self._new_state(adapter_set, loaded)
        try:
            return state.run(ids)[0, :, :].copy()
        finally:
            state.close()

    def _merge(self, name: str, loaded: LoadedAdapter, scale: float) -> None:
        self.sessions.wait()  # a session still opening in the background finishes first
        if self._prefixes is not None:
            self._prefixes.clear()  # states of the base before the merge
        replaced = self.weights.merge(loaded.adapter, scale)
        # DoRA norms are of the weights the layer now holds (PEFT: the merged base); cached sets hold old ones
        dora = [other for other in self._adapters.values() if other.handle.get("dora")]
        for other in dora:
            other.handle["norms"] = self.adapter_sets.dora_norms(other.adapter, other.path)
        if dora:
            self.adapter_sets.clear()
        self.sessions.reopen(replaced, adapters_loaded=bool(self._adapters))

    def _backend_info(self) -> dict:
        device = self.device.describe()
        if self.gpu:
            device.update(
                provider=WEBGPU,
                resident_lora_bytes=self.adapter_sets.resident_lora_bytes(),
                **self.gpu.info(),
            )
        return {
            "quant": self.layout["quant"],
            "variant": self.layout["variant"],
            "providers": self.sessions.spec.providers,
            "session_api": self.session_api,
            "prefix_cache": None
            if self._prefixes is None or self.gpu
            else {
                "max_bytes": self._prefixes.max_bytes,
                "bytes": self._prefixes.nbytes,
                "entries": len(self._prefixes),
                **self._prefixes.stats.as_dict(),
            },
            "plain_session": self.sessions.plain is not None,
            "specialised": self.sessions.specialised.info() if self.session_api == "c" else None,
            "device": device,
        }
