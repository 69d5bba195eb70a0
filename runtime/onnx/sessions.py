"""The ONNX engine's sessions through ONNX Runtime's Python binding (:class:`PythonSessions`): the GPU
(WebGPU), other execution providers (xnnpack, coreml, ...) and the portable variant. The CPU's fast
variant runs through the C API instead (:mod:`runtime.onnx.cpu_sessions`), where two graphs can share
one copy of the weights; here each session prepacks its own, so on the CPU the plain session is kept
only until the first adapter is added (``plain_session=None``).

Both session sets have one face: ``plain`` (or None) for base-only requests, ``lora`` (opened in the
background when the first adapter is added), ``value(array)`` for feeds, ``reopen(replaced)`` after
a merge, ``keeps_last`` with ``keep_one`` / ``keep_all``, ``placement()`` and ``end_profiling()``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.errors import EdgeLoraError, first_line
from edge_lora.onnx_format import names
from runtime.mapped_pages import release_pages, trim_heap
from runtime.onnx.device import DEVICE_LOCK, node_placement

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
INT4_ONNX_TYPE = 22  # TensorProto.INT4


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


@dataclass
class SessionSpec:
    """The files and execution settings every session of an engine is opened with."""

    model_path: Path
    plain_path: Path | None
    data_path: Path
    layout: dict
    providers: list[str]
    threads: int | None = None
    spin: bool = True
    profile_dir: Path | None = None
    gpu: object = None  # DeviceTensors on the GPU path
    ep_device: object = None

    def disabled_optimizers(self, merged: bool) -> list[str]:
        # ORT 1.32's QDQ selector transformer reads the file's initializer, not an override: with
        # a merged QDQ weight it would silently run the unmerged one (checked in the tests)
        disabled = ["QDQSelectorActionTransformer"] if merged and self.layout["variant"] == "portable" else []
        if not self.gpu and self.layout["variant"] == "fast":
            # folding the tied embedding's Reshape of lm_head's int4 weight copies that table (0.5B: 85 MB);
            # unfolded, the CPU Reshape aliases its input (no copy per run; decode speed measured equal)
            disabled.append("ConstantFolding")
        return disabled


class Background:
    """A session (or a check) run on demand: ``start()`` begins it on a thread (once), ``result()``
    waits for it (starting it here if nobody did) and re-raises its EdgeLoraError."""

    def __init__(self, open_session: Callable[[], object]) -> None:
        self._open, self._value, self._error = open_session, None, None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    @property
    def started(self) -> bool:
        with self._lock:
            return self._thread is not None

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
        if self.started:
            self._done.wait()

    def result(self) -> object:
        self.start()
        self._done.wait()
        if self._error:
            raise self._error
        return self._value


class SessionSet:
    """What both session sets share: ``plain`` (or None) and the LoRA session behind a
    :class:`Background` load (``_lora``, set by ``open``)."""

    plain: object = None
    _lora: Background | None = None

    @property
    def lora(self) -> object:
        return self._lora.result()

    @property
    def lora_started(self) -> bool:
        return self._lora.started

    def wait(self) -> None:
        """Wait for a LoRA session still loading in the background; start none."""
        if self._lora is not None:
            self._lora.wait()


class PythonSessions(SessionSet):
    """``model.plain.onnx`` and ``model.onnx`` through ONNX Runtime's Python binding, with the merged
    weights as initializer overrides (``overrides``: name -> (array, OrtValue borrowing it); a session
    keeps the snapshot it was opened with alive, since ORT reads the buffers for its lifetime).

    ``plain_until_adapter``: one session at a time (the CPU's default here): the plain one until the
    first adapter, then the LoRA one alone, whose rank-0 defaults serve base-only requests."""

    def __init__(self, spec: SessionSpec, plain_until_adapter: bool) -> None:
        import onnxruntime as ort

        self._ort, self.spec = ort, spec
        self.plain_until_adapter = plain_until_adapter
        self.overrides: dict[str, tuple[np.ndarray, object]] = {}
        self._profiled: list = []  # sessions opened with profiling on
        self.keep_one = ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
        self.keep_all = ort.OrtValue.ortvalue_from_numpy(np.array(0, dtype=np.int64))

    def value(self, array: np.ndarray) -> object:
        return self._ort.OrtValue.ortvalue_from_numpy(array)

    # --- opening ----------------------------------------------------------------------

    def _options(self, path: Path, overrides: dict) -> tuple[SessionOptions, list[str]]:
        """ONNX Runtime's options for one session, and the optimizers to disable in it."""
        ort, spec = self._ort, self.spec
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the LoRA inputs that are also initializers warn by design
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spec.spin else "0")
        if spec.threads:
            options.intra_op_num_threads = int(spec.threads)
            options.inter_op_num_threads = 1
        if overrides and spec.gpu:
            # the WebGPU plugin reads the file's initializers and ignores add_initializer (a merge
            # changed nothing there); replacing the external data before the graph is built works
            options.add_external_initializers(list(overrides), [value for _, value in overrides.values()])
        else:
            for name, (_, value) in overrides.items():
                options.add_initializer(name, value)
        if spec.profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = str(spec.profile_dir / path.stem)
        return options, spec.disabled_optimizers(bool(overrides))

    def _session(self, path: Path, overrides: dict) -> InferenceSession:
        ort, spec = self._ort, self.spec
        options, disabled = self._options(path, overrides)
        providers = spec.providers
        if spec.gpu:
            options.add_provider_for_devices([spec.ep_device], {})
            options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")  # placement()
            providers = None
        try:
            with DEVICE_LOCK if spec.gpu else contextlib.nullcontext():
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
        if not spec.gpu:  # the data file's pages ORT touched to prepack: out (runtime.mapped_pages)
            release_pages(spec.data_path)
            trim_heap()  # and what a freed session (a plain one whose last request ended) left in the heap
        if spec.profile_dir:
            self._profiled.append(session)
        return session

    def open(self, adapters_loaded: bool) -> None:
        """The plain session now, the LoRA one in the background when the first adapter is added (ORT
        releases the GIL while it initializes), so the first base-only token does not wait for, or
        share the CPU with, its load. Only the LoRA session, opened now, without a plain model, or
        when adapters are loaded and one session at a time is held."""
        overrides = dict(
            self.overrides
        )  # a snapshot: later merges must not change it under a loading session
        if not self.spec.plain_path or (self.plain_until_adapter and adapters_loaded):
            session = self._session(self.spec.model_path, overrides)
            self.plain, self._lora = None, Background(lambda: session)
            self._note_outputs(session)
            return
        self._lora = Background(lambda: self._session(self.spec.model_path, overrides))
        if adapters_loaded:  # reopened after a merge with adapters loaded: they will want it soon
            self._lora.start()
        self.plain = self._session(self.spec.plain_path, overrides)
        self._note_outputs(self.plain)

    def _note_outputs(self, session: InferenceSession) -> None:
        self.output_names = [o.name for o in session.get_outputs()]
        # bundles from before ``logits_to_keep`` lack the input; then every position gets logits
        self.keeps_last = names.LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}

    def reopen(self, replaced: dict[str, np.ndarray], adapters_loaded: bool) -> None:
        """Merged weights (initializer name -> array) replace the file's from now on: new sessions."""
        self.wait()  # let a session still opening in the background finish first
        int4 = {n for n, t in self.spec.layout["tensors"].items() if t["dtype"] == "int4"}
        for name, array in replaced.items():
            array = np.ascontiguousarray(array)
            if name in int4:
                array = _int4_ortvalue_source(array)
                value = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, INT4_ONNX_TYPE)
            else:
                value = self._ort.OrtValue.ortvalue_from_numpy(array)
            self.overrides[name] = (array, value)
        self.open(adapters_loaded)

    # --- the LoRA session ---------------------------------------------------------------

    def start_lora(self) -> None:
        if self.plain_until_adapter and self.plain is not None:
            # one copy of the weights: base-only requests move to the LoRA graph at rank 0 (those running
            # keep the plain session alive until they end); dropped before the LoRA one loads, so the
            # two copies never coexist (the process's peak). Freed on this thread, its memory would stay
            # in this thread's malloc arena while the LoRA session allocates in the loading thread's.
            self.plain = None
            trim_heap()
        self._lora.start()

    def placement(self) -> dict[str, dict[str, list[tuple[str, str]]]]:
        """Which provider runs each node, per session (``plain``, ``lora``): ``{session: {provider:
        [(op_type, node), ...]}}``. Recorded on the GPU path only (the CPU path has one provider)."""
        if not self.spec.gpu:
            return {}
        sessions = {"plain": self.plain, "lora": self.lora}
        return {k: node_placement(s) for k, s in sessions.items() if s is not None}

    def end_profiling(self) -> list[Path]:
        done, self._profiled = self._profiled, []
        return [Path(s.end_profiling()) for s in done]


def _int4_ortvalue_source(values: np.ndarray) -> np.ndarray:
    """A buffer for an INT4 OrtValue: ORT takes the shape from the array and reads the packed bytes
    from its start, so the array has the logical shape and holds the nibbles up front."""
    from edge_lora.onnx_format.weight_quant import pack_int4

    packed = np.frombuffer(pack_int4(values), dtype=np.uint8)
    buffer = np.zeros(values.shape, dtype=np.uint8)
    buffer.reshape(-1)[: packed.size] = packed
    return buffer
