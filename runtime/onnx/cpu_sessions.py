"""The ONNX engine's sessions on the CPU (fast variant) through ONNX Runtime's C API: ``model.plain.onnx``
for base-only requests and ``model.onnx`` for requests with adapters, both held at once over ONE copy
of the weights.

Every weight of the layout is handed to both sessions as a shared initializer over a read-only
memory map of ``model.onnx.data`` (no copy), and both sessions are created with one prepacked-weights
container, so ONNX Runtime prepacks each weight once and the second graph adds only its own nodes
(SmolLM2-135M int4: +7 MB, against +133 MB for a second session through the Python binding, which
has neither). The mapped pages ORT reads to prepack are given back while it reads them, and what a
kernel still reads from the file later (the tied embedding's rows) comes back on demand
(:mod:`runtime.mapped_pages`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format import names
from edge_lora.onnx_format.weight_store import NUMPY_DTYPES
from runtime.mapped_pages import dropping_pages, release_pages, trim_heap
from runtime.onnx.ort_capi import ELEMENT_TYPES, OrtApi, Tensor
from runtime.onnx.ort_session import PrepackedWeights, Session, SessionConfig
from runtime.onnx.sessions import Background, SessionSet, SessionSpec
from runtime.onnx.specialised import DEFAULT_CAPACITY, SpecialisedSessions


def shared_weights(api: OrtApi, layout: dict, data: np.memmap, data_path: Path) -> dict[str, Tensor]:
    """Every tensor the layout places for a linear weight (packed blocks, scales, zero points), as
    tensors over ``data``, the read-only map of the data file."""
    shared = {}
    for entry in layout["weights"].values():
        for name in entry["tensors"].values():
            info = layout["tensors"][name]
            dtype = np.dtype(NUMPY_DTYPES[info["dtype"]])
            if info["dtype"] == "int4" or dtype not in ELEMENT_TYPES or info["offset"] % dtype.itemsize:
                continue  # left to the session's own loading
            end = info["offset"] + info["length"]
            if end > data.size:
                raise EdgeLoraError(
                    f"{data_path.name} ends before tensor {name!r} that onnx_layout.json places in it",
                    path=data_path,
                    hint="the file is truncated: re-export the bundle",
                )
            shared[name] = Tensor(api, data[info["offset"] : end].view(dtype).reshape(info["shape"]))
    return shared


class CpuSessions(SessionSet):
    """Both graphs through the C API over shared weights; merged weights replace shared tensors."""

    def __init__(
        self, spec: SessionSpec, plain_session: bool | None, specialise: int = DEFAULT_CAPACITY
    ) -> None:
        self.api = OrtApi.get()
        self.spec = spec
        self.keep_plain = plain_session is not False and spec.plain_path is not None
        self.config = SessionConfig(
            threads=spec.threads,
            spin=spec.spin,
            disabled_optimizers=spec.disabled_optimizers(merged=False),
            profile_prefix=str(spec.profile_dir / "session") if spec.profile_dir else None,
        )
        self.data_map = np.memmap(spec.data_path, dtype=np.uint8, mode="r")  # held: pages dropped safely
        self.weights = shared_weights(self.api, spec.layout, self.data_map, spec.data_path)
        self.keep_one = self.value(np.array(1, dtype=np.int64))
        self.keep_all = self.value(np.array(0, dtype=np.int64))
        self._masks: dict[int, Tensor] = {}
        self._mask_lock = threading.Lock()
        self._profiled: list[Session] = []
        self.container: PrepackedWeights | None = None
        # sessions cut to an adapter set's shape (runtime/onnx/specialised.py), over the same weights
        self.specialised = SpecialisedSessions(self._specialised_session, spec.model_path, specialise)

    def value(self, array: np.ndarray) -> Tensor:
        return Tensor(self.api, np.ascontiguousarray(array))

    def mask(self, ones: np.ndarray, total: int) -> Tensor:
        """The attention mask of ``total`` positions, a view of ``ones``, made once per length."""
        with self._mask_lock:
            found = self._masks.get(total)
            if found is None:
                found = self._masks[total] = Tensor(self.api, ones[:, :total])
            return found

    def _specialised_session(self, model_bytes: bytes) -> Session:
        return self._session(self.spec.model_path, self.container, model_bytes)

    def _session(self, path: Path, container: PrepackedWeights, model_bytes: bytes | None = None) -> Session:
        with dropping_pages(self.data_map):  # the pages ORT reads to prepack: out as it goes
            session = Session(path, self.config, container, self.weights, model_bytes)
        release_pages(self.spec.data_path)  # any it mapped itself (initializers not shared)
        trim_heap()
        if self.config.profile_prefix:
            self._profiled.append(session)
        return session

    def open(self, adapters_loaded: bool) -> None:
        """The plain session now; the LoRA one in the background once adapters are loaded (at once
        when adapters already are, as after a merge, or when there is no plain session)."""
        container = PrepackedWeights(
            self.api
        )  # a fresh one: a merge's old weights leave with the old sessions
        self.container = container
        self.specialised.drop(lambda _key: True)  # sessions over weights a merge replaced
        lora = Background(lambda: self._session(self.spec.model_path, container))
        if not self.keep_plain:
            session = lora.result()
            self.plain, self._lora = None, lora
            self._note_outputs(session)
            return
        plain = self._session(self.spec.plain_path, container)
        self.plain, self._lora = plain, lora
        self._note_outputs(plain)
        if adapters_loaded:
            lora.start()

    def _note_outputs(self, session: Session) -> None:
        self.output_names = session.output_names
        # bundles from before ``logits_to_keep`` lack the input; then every position gets logits
        self.keeps_last = names.LOGITS_TO_KEEP in session.overridable

    def reopen(self, replaced: dict[str, np.ndarray], adapters_loaded: bool) -> None:
        """Merged weights (initializer name -> array) replace the shared ones: new sessions over them."""
        self.wait()
        weights = dict(self.weights)  # a running request keeps the old sessions and their tensors
        for name, array in replaced.items():
            weights[name] = self.value(array)
        self.weights = weights
        self.open(adapters_loaded)

    def start_lora(self) -> None:
        self._lora.start()

    def placement(self) -> dict:
        return {}  # one provider runs every node

    def end_profiling(self) -> list[Path]:
        done, self._profiled = self._profiled, []
        return [s.end_profiling() for s in done]
