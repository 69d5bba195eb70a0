"""The ONNX Runtime sessions of an :class:`~runtime.onnx_backend.OnnxEngine`: execution providers,
session options, merged weights as initializer overrides, profiling, and the LoRA session's load in
the background (the plain session first, the LoRA one when the first adapter is added).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.errors import EdgeLoraError, first_line
from edge_lora.onnx_format import names
from runtime.mapped_pages import release_pages, trim_heap
from runtime.onnx_device import DEVICE_LOCK, node_placement

if TYPE_CHECKING:
    from onnxruntime import InferenceSession, SessionOptions

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
# providers whose kernels read device memory: a CPU buffer bound as both past and present is not
# one buffer to them, so those sessions keep the Concat-style state
DEVICE_PROVIDERS = {"CUDAExecutionProvider", "WebGpuExecutionProvider"}


def resolve_providers(provider: str | list[str]) -> list[str]:
    """Execution provider names (ours or ONNX Runtime's) -> those available here, CPU always last."""
    import onnxruntime as ort

    wanted = [provider] if isinstance(provider, str) else list(provider)
    available = set(ort.get_available_providers())
    chosen = []
    for name in wanted:
        full = PROVIDERS.get(name.lower(), name)
        if full not in PROVIDERS.values():
            raise EdgeLoraError(
                f"unknown execution provider {name!r}", hint=f"choose from {', '.join(PROVIDERS)}"
            )
        if full in available:
            chosen.append(full)
        else:
            warnings.warn(
                f"execution provider {name!r} ({full}) is not available in this onnxruntime build; "
                f"falling back to CPU (available: {', '.join(sorted(available))})",
                RuntimeWarning,
                stacklevel=3,
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class Background:
    """A session (or a check) run on demand: ``start()`` begins it on a thread (once), ``result()``
    waits for it (starting it here if nobody did) and re-raises its EdgeLoraError."""

    def __init__(self, open_session: Callable[[], object]) -> None:
        self._open, self._value, self._error = open_session, None, None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                # not a daemon: interpreter shutdown must wait for it, or ORT aborts the process mid-load
                self._thread = threading.Thread(target=self._run, daemon=False)
                self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._open()
        except EdgeLoraError as err:
            self._error = err
        finally:
            self._done.set()

    def wait(self) -> None:
        """Wait for a load already under way; start none."""
        with self._lock:
            started = self._thread is not None
        if started:
            self._done.wait()

    def result(self) -> object:
        self.start()
        self._done.wait()
        if self._error:
            raise self._error
        return self._value


class OnnxSessions:
    """The session half of :class:`~runtime.onnx_backend.OnnxEngine` (mixed into it): opening
    ``model.plain.onnx`` and ``model.onnx`` with the engine's options and merged-weight overrides.
    Uses the engine's ``_ort``, ``layout``, ``gpu``, ``_ep_device``, ``providers``, ``threads``,
    ``spin``, ``profile_dir``, ``model_path``, ``plain_path``, ``data_path`` and ``_overrides``."""

    def _session_options(self, path: Path, overrides: dict) -> tuple[SessionOptions, list[str]]:
        """ONNX Runtime's options for one session, and the optimizers to disable in it."""
        ort = self._ort
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the LoRA inputs that are also initializers warn by design
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        if overrides and self.gpu:
            # the WebGPU plugin reads the file's initializers and ignores add_initializer (a merge
            # changed nothing there); replacing the external data before the graph is built works
            options.add_external_initializers(list(overrides), [value for _, value in overrides.values()])
        else:
            for name, (_, value) in overrides.items():
                options.add_initializer(name, value)
        # ORT 1.32's QDQ selector transformer reads the file's initializer, not an override: with
        # a merged QDQ weight it would silently run the unmerged one (checked in the tests)
        disabled = (
            ["QDQSelectorActionTransformer"] if overrides and self.layout["variant"] == "portable" else []
        )
        if not self.gpu and self.layout["variant"] == "fast":
            # folding the tied embedding's Reshape of lm_head's int4 weight copies that table (0.5B: 85 MB);
            # unfolded, the CPU Reshape aliases its input (no copy per run; decode speed measured equal)
            disabled.append("ConstantFolding")
        if self.profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = str(self.profile_dir / path.stem)
        return options, disabled

    def _session(self, path: Path, overrides: dict) -> InferenceSession:
        ort = self._ort
        options, disabled = self._session_options(path, overrides)
        providers = self.providers
        if self.gpu:
            options.add_provider_for_devices([self._ep_device], {})
            options.add_session_config_entry(
                "session.record_ep_graph_assignment_info", "1"
            )  # for placement()
            providers = None
        try:
            with DEVICE_LOCK if self.gpu else contextlib.nullcontext():
                session = ort.InferenceSession(
                    str(path), sess_options=options, providers=providers, disabled_optimizers=disabled
                )
        except Exception as err:  # ORT raises its own exception types for every load failure
            raise EdgeLoraError(
                f"ONNX Runtime cannot load the model ({first_line(err)})",
                path=path,
                hint="re-export the bundle, or upgrade onnxruntime",
            ) from None
        session.edge_lora_overrides = overrides
        if not self.gpu:  # the data file's pages ORT touched to prepack: out (runtime.mapped_pages)
            release_pages(self.data_path)
            trim_heap()  # and what a freed session (a plain one whose last request ended) left in the heap
        if self.profile_dir:
            self._profiled.append(session)
        return session

    def end_profiling(self) -> list[Path]:
        """Write the profiles of the sessions opened with ``profile_dir`` (ONNX Runtime's JSON trace)
        and return their paths."""
        done, self._profiled = self._profiled, []
        return [Path(s.end_profiling()) for s in done]

    def _open_sessions(self) -> None:
        """The plain session now, the LoRA one in the background when the first adapter is added (ORT
        releases the GIL while it initializes), so the first base-only token does not wait for, or
        share the CPU with, its load. Only the LoRA session, opened now, with ``plain_session=False``
        or when adapters are loaded on a CPU engine that holds one session at a time."""
        overrides = dict(
            self._overrides
        )  # a snapshot: later merges must not change it under a loading session
        if not self.plain_path or (self._plain_until_adapter and self._adapters):
            self.plain_session = None
            session = self._session(self.model_path, overrides)
            self._lora = Background(lambda: session)
            self.output_names = [o.name for o in self.lora_session.get_outputs()]
            self._note_logits_to_keep(self.lora_session)
            return
        self._lora = Background(lambda: self._session(self.model_path, overrides))
        if self._adapters:  # reopened after a merge with adapters loaded: they will want it soon
            self._lora.start()
        self.plain_session = self._session(self.plain_path, overrides)
        self.output_names = [o.name for o in self.plain_session.get_outputs()]
        self._note_logits_to_keep(self.plain_session)

    def _note_logits_to_keep(self, session: InferenceSession) -> None:
        """Bundles from before ``logits_to_keep`` lack the input; then every position gets logits."""
        self.keeps_last = names.LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
        self.keep_one = self._ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
        self.keep_all = self._ort.OrtValue.ortvalue_from_numpy(np.array(0, dtype=np.int64))

    @property
    def lora_session(self) -> InferenceSession:
        return self._lora.result()

    def prepare_for_adapters(self) -> None:
        """Open the LoRA session now and wait for it, so that the first request with an adapter does
        not (an app calls it at startup, off the request path); on a CPU engine that holds one
        session at a time, base-only requests move to it from here on."""
        self._start_lora()
        self._lora.result()

    def _start_lora(self) -> None:
        if self._plain_until_adapter and self.plain_session is not None:
            # one copy of the weights: base-only requests move to the LoRA graph at rank 0 (those running
            # keep the plain session alive until they end); dropped before the LoRA one loads, so the
            # two copies never coexist (the process's peak). Freed on this thread, its memory would stay
            # in this thread's malloc arena while the LoRA session allocates in the loading thread's.
            self.plain_session = None
            trim_heap()
        self._lora.start()

    def placement(self) -> dict[str, dict[str, list[tuple[str, str]]]]:
        """Which provider runs each node, per session (``plain``, ``lora``): ``{session: {provider:
        [(op_type, node), ...]}}``. Recorded on the GPU path only (the CPU path has one provider)."""
        if not self.gpu:
            return {}
        sessions = {"plain": self.plain_session, "lora": self.lora_session}
        return {k: node_placement(s) for k, s in sessions.items() if s is not None}
