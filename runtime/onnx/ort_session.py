"""ONNX Runtime sessions on the CPU through the C API (:mod:`runtime.onnx.ort_capi`): several graphs over
one weights file share one :class:`PrepackedWeights` container, so ONNX Runtime keeps one copy of
the prepacked weights however many graph variants are open, and a decode step is a few direct calls.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.errors import EdgeLoraError, first_line
from runtime.onnx.ort_capi import LOG_ERROR, ORT_ENABLE_ALL, OrtApi, OrtError, Tensor


@dataclass
class SessionConfig:
    """How every session of an engine runs (the options of ``onnxruntime.SessionOptions`` it uses)."""

    threads: int | None = None
    spin: bool = True
    disabled_optimizers: list[str] = field(default_factory=list)
    profile_prefix: str | None = None


class PrepackedWeights:
    """ONNX Runtime's shared prepacked-weights container: sessions created with it keep one copy of
    each prepacked weight (MatMulNBits' packed int4 blocks, ...) whatever their number."""

    def __init__(self, api: OrtApi) -> None:
        self.api = api
        self.handle = api._out(api.CreatePrepackedWeightsContainer)

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.api.ReleasePrepackedWeightsContainer(self.handle)
            self.handle = None


class Session:
    """One graph opened through the C API, with ``overrides`` (initializer name -> Tensor) in place
    of the file's initializers; the tensors and the container are held for the session's life."""

    def __init__(
        self,
        path: Path,
        config: SessionConfig,
        container: PrepackedWeights,
        overrides: dict[str, Tensor] | None = None,
        model_bytes: bytes | None = None,
    ) -> None:
        """``model_bytes``: a graph made in memory (:mod:`runtime.onnx.specialised`) in place of the file
        at ``path``, whose folder holds the external data it names."""
        self.api = api = container.api
        self.path, self.container = path, container
        self.overrides = dict(overrides or {})
        options = api._out(api.CreateSessionOptions)
        try:
            self._configure(options, config)
            if model_bytes is None:
                self.handle = api._out(
                    api.CreateSessionWithPrepackedWeightsContainer,
                    api.env,
                    os.fsencode(path),
                    options,
                    container.handle,
                )
            else:
                key = b"session.model_external_initializers_file_folder_path"
                api.AddSessionConfigEntry(options, key, os.fsencode(path.parent))
                buffer = ctypes.create_string_buffer(model_bytes, len(model_bytes))
                self.handle = api._out(
                    api.CreateSessionFromArrayWithPrepackedWeightsContainer,
                    api.env,
                    buffer,
                    len(model_bytes),
                    options,
                    container.handle,
                )
        except OrtError as err:
            raise EdgeLoraError(
                f"ONNX Runtime cannot load the model ({first_line(err)})",
                path=path,
                hint="re-export the bundle, or upgrade onnxruntime",
            ) from None
        finally:
            api.ReleaseSessionOptions(options)
        self.output_names = self._names(api.SessionGetOutputCount, api.SessionGetOutputName)
        self.overridable = set(
            self._names(api.SessionGetOverridableInitializerCount, api.SessionGetOverridableInitializerName)
        )

    def _configure(self, options: ctypes.c_void_p, config: SessionConfig) -> None:
        api = self.api
        api.SetSessionLogSeverityLevel(options, LOG_ERROR)  # LoRA inputs that are also initializers warn
        api.SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL)
        entries = {"session.intra_op.allow_spinning": "1" if config.spin else "0"}
        if config.disabled_optimizers:
            entries["optimization.disable_specified_optimizers"] = ";".join(config.disabled_optimizers)
        for key, value in entries.items():
            api.AddSessionConfigEntry(options, key.encode(), value.encode())
        if config.threads:
            api.SetIntraOpNumThreads(options, int(config.threads))
            api.SetInterOpNumThreads(options, 1)
        if config.profile_prefix:
            api.EnableProfiling(options, os.fsencode(f"{config.profile_prefix}_{self.path.stem}"))
        for name, tensor in self.overrides.items():
            api.AddInitializer(options, name.encode(), tensor.value)

    def _names(self, count_call: object, name_call: object) -> list[str]:
        count = ctypes.c_size_t()
        count_call(self.handle, ctypes.byref(count))
        out = []
        for i in range(count.value):
            pointer = ctypes.c_void_p()
            name_call(self.handle, i, self.api.allocator, ctypes.byref(pointer))
            out.append(self.api.take_string(pointer))
        return out

    def binding(self) -> Binding:
        return Binding(self)

    def end_profiling(self) -> Path:
        pointer = ctypes.c_void_p()
        self.api.SessionEndProfiling(self.handle, self.api.allocator, ctypes.byref(pointer))
        return Path(self.api.take_string(pointer))

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self.api.ReleaseSession(self.handle)
            self.handle = None


class Binding:
    """An IoBinding of one session, with the method names of ``onnxruntime.IOBinding``: inputs and
    outputs bound once, rebound when they change; ``run`` reads them in place. It holds every tensor
    it bound until that name is bound again."""

    def __init__(self, session: Session) -> None:
        self.session, self.api = session, session.api
        self.handle = self.api._out(self.api.CreateIoBinding, session.handle)
        self._held: dict[str, Tensor] = {}

    def bind_ortvalue_input(self, name: str, tensor: Tensor) -> None:
        self.api.BindInput(self.handle, name.encode(), tensor.value)
        self._held["in:" + name] = tensor

    def bind_ortvalue_output(self, name: str, tensor: Tensor) -> None:
        self.api.BindOutput(self.handle, name.encode(), tensor.value)
        self._held["out:" + name] = tensor

    def run(self) -> None:
        self.api.RunWithBinding(self.session.handle, None, self.handle)

    def close(self) -> None:
        if getattr(self, "handle", None):
            self.api.ReleaseIoBinding(self.handle)
            self.handle = None
        self._held = {}

    def __del__(self) -> None:
        self.close()
