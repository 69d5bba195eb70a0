"""The ONNX Runtime backend: one exported decoder, adapters as feeds of its LoRA slots.

One session at a time on the CPU, so one copy of the prepacked weights per process: until the
first adapter is added ``model.plain.onnx`` (no LoRA nodes) runs at the base's own speed; the first
adapter replaces it with ``model.onnx`` (a LoRA side path on every linear layer), which then runs
every request, those without adapters through its rank-0 defaults (1-5% slower per step than the
plain graph, SmolLM2-135M and Qwen2.5-0.5B int4, 2026-11-28; 7-11% in an earlier measurement).
``plain_session=True`` (the GPU's default) keeps both sessions, at the cost of a second copy of the
weights; ``False`` opens only the LoRA one. An adapter set becomes one dict of OrtValues (ranks
concatenated, scales folded into B), built once and cached, so a swap between requests is a dict
lookup and never reloads a session; each request carries its own dict, so concurrent requests with
other sets are not disturbed. ``merge`` dequantizes, adds and requantizes the touched weights and
reopens the sessions with those initializers overridden: zero per-token cost afterwards.

This module holds the engine itself: its construction (device, files, options, buffers) and the
hooks that tie the rest together. The rest lives beside it: sessions and their options
(:mod:`runtime.onnx_sessions`), adapter sets and their feeds (:mod:`runtime.onnx_adapter_sets`),
merging (:mod:`runtime.onnx_merge`), and the per-sequence KV cache and decode step
(:mod:`runtime.onnx_decode_states`: :class:`SharedKVState` on the fast variant on CPU and GPU,
:class:`OnnxState` for the portable variant and device providers).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
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
from runtime.onnx_adapter_sets import LORA_DTYPES, OnnxAdapterSets
from runtime.onnx_decode_states import OnnxState, SharedKVState
from runtime.onnx_device import WEBGPU, DeviceTensors, find_webgpu
from runtime.onnx_merge import OnnxMerge
from runtime.onnx_sessions import DEVICE_PROVIDERS, Background, OnnxSessions, resolve_providers

__all__ = ["OnnxEngine", "OnnxState", "SharedKVState", "resolve_providers"]


class OnnxEngine(OnnxSessions, OnnxAdapterSets, OnnxMerge, Engine):
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
    ) -> None:
        """``device="gpu"`` runs on ONNX Runtime's WebGPU provider with the KV cache and the LoRA
        feeds resident on the device (``auto``: a hardware GPU if there is one, else the CPU);
        ``provider`` names other execution providers (xnnpack, coreml, nnapi, ...) for the CPU path.
        ``profile_dir``: ONNX Runtime's per-node profile of every session, written there by
        :meth:`end_profiling` (which provider ran each node, for how long, and every device copy).
        ``plain_session``: ONNX Runtime prepacks the weights per session and cannot share them from
        Python, so each session is a copy of the weights. ``None`` (the CPU's default): the plain
        session until the first adapter is added, then the LoRA session alone; ``True`` (the GPU's
        default): both, base-only requests at the plain graph's speed; ``False``: the LoRA one alone."""
        super().__init__(bundle, verify_hashes=verify_hashes, trusted_keys=trusted_keys)
        import onnxruntime as ort

        self._ort = ort
        ep_device = self._choose_device(device, provider)
        variant = self._default_variant(variant, ep_device)
        data_check = self._locate_files(quant, variant, plain_session, ep_device)
        self._set_up_execution(ep_device, provider, threads, spin, profile_dir)
        self._set_up_decode_inputs()
        self._set_up_adapter_caches()
        try:
            self._open_sessions()
        finally:
            data_check.result()  # a mismatch raises here, and wins over a load error it may explain
        if not self.gpu:  # nothing else runs yet: DONTNEED is safe too where the kernel lacks PAGEOUT
            release_pages(self.data_path, quiet=True)

    # --- construction -----------------------------------------------------------------

    def _choose_device(self, device: str, provider: str | list[str]) -> object | None:
        """Set ``self.device``; the WebGPU provider's device to run on, or None for the CPU path."""
        self.device, ep_device = CPU, None
        if check_device(device) != "cpu":
            if provider not in ("cpu", ["cpu"]):
                raise EdgeLoraError(
                    f"device={device!r} and provider={provider!r} both choose where to run",
                    hint="give one: device='gpu' is ONNX Runtime's WebGPU provider",
                )
            self.device, ep_device = find_webgpu(self._ort, device)
        return ep_device

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
    ) -> Background:
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
        # None on the CPU: the plain session only until the first adapter (one session at a time)
        self._plain_until_adapter = plain_session is None and ep_device is None
        self.plain_path = self._checked(folder + plain) if plain and plain_session is not False else None
        self.slots = {m: tuple(s) for m, s in self.layout["lora_slots"].items()}
        self.lora_dtype = LORA_DTYPES[self.layout.get("lora_dtype", "float32")]
        return data_check

    def _set_up_execution(
        self,
        ep_device: object | None,
        provider: str | list[str],
        threads: int | None,
        spin: bool,
        profile_dir: str | os.PathLike | None,
    ) -> None:
        """Where and how the sessions run: the device's tensors, providers, threads, profiling."""
        self._ep_device = ep_device
        self.gpu = DeviceTensors(self._ort, ep_device) if ep_device is not None else None
        if self.gpu and self.layout["variant"] != "fast":
            raise EdgeLoraError(
                f"the {self.layout['variant']} ONNX variant does not run on the GPU path",
                path=self.model_path,
                hint="export the fast variant (--onnx-variant fast) or run on device='cpu'",
            )
        self.providers = [WEBGPU, "CPUExecutionProvider"] if self.gpu else resolve_providers(provider)
        self.threads = threads
        self.spin = spin
        self.profile_dir = Path(profile_dir) if profile_dir else None
        if self.profile_dir:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
        self._profiled: list = []  # sessions opened with profiling on
        self.shared_kv = self.layout["variant"] == "fast" and (
            self.gpu is not None or not DEVICE_PROVIDERS & set(self.providers)
        )

    def _set_up_decode_inputs(self) -> None:
        """The KV cache's input/output names per layer, and the ones every attention mask slices."""
        c = self.config
        self.cache_names = [
            pair
            for i in range(c.num_hidden_layers)
            for pair in (
                (names.past_key(i), names.present_key(i)),
                (names.past_value(i), names.present_value(i)),
            )
        ]
        self.mask_ones = np.ones(
            (1, self.max_context), np.int64
        )  # attention masks are slices of it (read-only)

    def _set_up_adapter_caches(self) -> None:
        """The weights merges read, the merged overrides, and the caches of adapter sets' feeds."""
        # LoRA input -> rank-1 zeros on the device (never a zero-size tensor there)
        self._gpu_pads: dict[str, object] = {}
        # the empty set's device feeds (pads only), when there is no plain session
        self._no_adapters: dict = {}
        self._upload_lock = threading.Lock()
        self.weights = WeightStore(self.layout, self.data_path)
        # merged weights: initializer name -> (array, OrtValue borrowing it); a session keeps the
        # snapshot it was opened with alive, since ORT reads the buffers for the session's lifetime
        self._overrides: dict[str, tuple[np.ndarray, object]] = {}
        self._set_cache: OrderedDict[tuple, dict] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _checked(self, rel: str) -> Path:
        return self.bundle.verify_file(rel) if self.verify_hashes else self.bundle.require(rel)

    # --- inference ------------------------------------------------------------------

    def _new_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState:
        choice = self._pick(adapter_set, loaded)
        return SharedKVState(self, choice) if self.shared_kv else OnnxState(self, choice)

    def _full_logits(
        self, ids: list[int], adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]
    ) -> np.ndarray:
        state = self._new_state(adapter_set, loaded)
        try:
            return state.run(ids)[0, :, :].copy()
        finally:
            state.close()

    def _backend_info(self) -> dict:
        device = self.device.describe()
        if self.gpu:
            device.update(provider=WEBGPU, resident_lora_bytes=self._resident_lora_bytes(), **self.gpu.info())
        return {
            "quant": self.layout["quant"],
            "variant": self.layout["variant"],
            "providers": self.providers,
            "plain_session": self.plain_session is not None,
            "device": device,
        }
