"""Thin, checked wrappers over llama-cpp-python's low-level C API.

Every C call that can fail is checked here (NULL pointers, non-zero status) and turned into an
``EdgeLoraError`` naming the file and what to do; nothing above this module touches ctypes.
Not thread-safe: the engine serialises all calls on one context with a lock.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.errors import EdgeLoraError
from runtime.devices import CPU, Device, is_software

_state = {"backend": False, "quiet": None, "ggml": None}
GPU_TYPES = (1, 2)  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU


def llama_cpp():
    try:
        import llama_cpp as lib
    except ImportError:
        raise EdgeLoraError(
            "the llama.cpp backend needs llama-cpp-python", hint="pip install 'edge-lora[llama]'"
        ) from None
    if not _state["backend"]:
        lib.llama_backend_init()
        _state["backend"] = True
    return lib


def silence_log(verbose: bool) -> None:
    """llama.cpp logs every load to stderr; keep quiet unless asked (the callback must stay alive)."""
    lib = llama_cpp()
    if verbose:
        if _state["quiet"] is not None:
            lib.llama_log_set(ctypes.cast(None, lib.llama_log_callback), ctypes.c_void_p(0))  # back to stderr
            _state["quiet"] = None
    elif _state["quiet"] is None:
        _state["quiet"] = lib.llama_log_callback(lambda level, text, user_data: None)
        lib.llama_log_set(_state["quiet"], ctypes.c_void_p(0))


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Intel AMX: llama.cpp's AMX buffer type crashed decoding Q8_0/Q4_0 here, so repacking goes off."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def default_extra_bufts() -> bool:
    return not cpu_has_amx()


def _ggml():
    """ggml's backend registry (ggml-backend.h), through the library llama-cpp-python ships."""
    if _state["ggml"] is None:
        llama_cpp()
        from llama_cpp._ggml import libggml as ggml

        ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        for fn in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_type.restype = ctypes.c_int
        _state["ggml"] = ggml
    return _state["ggml"]


@dataclass(frozen=True)
class GpuDevice:
    ptr: int  # ggml_backend_dev_t
    name: str  # "Vulkan0", "Metal", "CUDA0"
    description: str  # the driver's name for it, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"


def gpu_backends() -> list[str]:
    """The GPU backends this llama-cpp-python was built with (``Vulkan``, ``Metal``, ``CUDA``, ...)."""
    ggml = _ggml()
    names = [
        ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
        for i in range(ggml.ggml_backend_reg_count())
    ]
    return [n for n in names if n not in ("CPU", "BLAS", "RPC")]


def gpu_devices() -> list[GpuDevice]:
    """The GPU devices llama.cpp sees (Vulkan lists a software device such as Mesa's lavapipe only
    when ``GGML_VK_VISIBLE_DEVICES`` names it)."""
    ggml = _ggml()
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) in GPU_TYPES:
            found.append(
                GpuDevice(
                    dev,
                    ggml.ggml_backend_dev_name(dev).decode(),
                    ggml.ggml_backend_dev_description(dev).decode(),
                )
            )
    return found


NO_GPU_BUILD = (
    'this llama-cpp-python was built without a GPU backend: reinstall it with CMAKE_ARGS="-DGGML_VULKAN=on" '
    "(or -DGGML_METAL=on, -DGGML_CUDA=on) pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python; "
    "scripts/software-gpu.sh builds and caches the Vulkan one"
)
NO_GPU_DEVICE = (
    "llama.cpp's {backends} backend found no GPU device: install the GPU's driver (Vulkan: Mesa or the vendor's); "
    "a software device such as Mesa's lavapipe is listed only when GGML_VK_VISIBLE_DEVICES names it"
)


def find_gpu(want: str) -> tuple[Device, list[GpuDevice]]:
    """The device for ``want`` ("gpu" or "auto"): ``(Device, [GpuDevice])`` to offload to, or
    ``(CPU, [])`` when ``auto`` finds no hardware GPU. ``gpu`` without one raises, saying what is missing."""
    found = gpu_devices()
    if want == "auto":
        found = [d for d in found if not is_software(d.description)]
    if not found:
        if want == "gpu":
            backends = gpu_backends()
            reason = NO_GPU_DEVICE.format(backends="/".join(backends)) if backends else NO_GPU_BUILD
            raise EdgeLoraError(f"device='gpu': {reason}", hint="or run on device='cpu'")
        return CPU, []
    first = found[0]
    return Device("gpu", f"{first.name} ({first.description})", software=is_software(first.description)), [
        first
    ]


class Model:
    """A loaded llama_model (weights only); free() releases it and every adapter loaded on it."""

    def __init__(
        self,
        path: Path,
        *,
        devices: list[GpuDevice] = (),
        n_gpu_layers: int = 0,
        use_extra_bufts: bool | None = None,
        use_mmap: bool | None = None,
    ):
        """``devices``: the GPUs to offload ``n_gpu_layers`` layers to; none keeps every tensor and
        every op on the CPU, even in a GPU build (llama.cpp would otherwise use all it finds).
        ``use_mmap=None``: map the file unless the CPU's extra buffer types repack the weights; a
        repacked tensor is copied out of the mapping, whose touched pages then stay resident as a
        second copy of the weights (reading the file instead leaves one)."""
        lib = llama_cpp()
        self.path = Path(path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers) if devices else 0
        # a NULL-terminated ggml_backend_dev_t list, kept alive with the model
        self._devices = (ctypes.c_void_p * (len(devices) + 1))(*[d.ptr for d in devices], None)
        params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        params.use_extra_bufts = default_extra_bufts() if use_extra_bufts is None else bool(use_extra_bufts)
        self.use_extra_bufts = bool(params.use_extra_bufts)
        params.use_mmap = not (self.use_extra_bufts and not devices) if use_mmap is None else bool(use_mmap)
        self.use_mmap = bool(params.use_mmap)
        self.ptr = lib.llama_model_load_from_file(os.fspath(self.path).encode(), params)
        if not self.ptr:
            raise EdgeLoraError(
                "llama.cpp could not load this GGUF model",
                path=self.path,
                hint="the file is corrupt, truncated or from a newer format; re-export the bundle",
            )
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def meta(self, key: str) -> str | None:
        lib = llama_cpp()
        buf = ctypes.create_string_buffer(512)
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def load_lora(self, path: Path):
        lib = llama_cpp()
        ptr = lib.llama_adapter_lora_init(self.ptr, os.fspath(path).encode())
        if not ptr:  # a NULL pointer: llama.cpp rejected the file (wrong base, bad tensors)
            raise EdgeLoraError(
                "llama.cpp could not load this LoRA adapter",
                path=path,
                hint="wrong base model? re-export the adapter for this bundle",
            )
        return ptr

    def free_lora(self, ptr) -> None:
        if ptr and self.ptr:
            llama_cpp().llama_adapter_lora_free(ptr)

    def free(self) -> None:
        if self.ptr:
            llama_cpp().llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """One llama_context (KV cache, one sequence) over a Model."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        threads: int,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        precise: bool = False,
    ):
        """``n_batch``: tokens per ``llama_decode`` call; ``n_ubatch``: tokens per compute graph
        (default ``n_batch``). llama.cpp reserves its compute buffer for ``n_ubatch`` tokens."""
        lib = llama_cpp()
        self.model = model
        self.n_ctx = int(n_ctx)
        self.n_batch = max(1, min(int(n_batch), self.n_ctx))
        self.n_ubatch = max(1, min(int(n_ubatch or self.n_batch), self.n_batch))
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_ubatch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = int(threads)
        if (
            precise
        ):  # f16 KV cache and flash attention cost ~1e-2 in logits on strong adapters; f32 is exact to ~1e-5
            params.type_k = params.type_v = 0  # GGML_TYPE_F32
            params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise EdgeLoraError(
                f"llama.cpp could not create a context of {self.n_ctx} tokens",
                path=model.path,
                hint="lower n_ctx (memory) or n_gpu_layers",
            )
        self.memory = lib.llama_get_memory(self.ptr)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = model.n_vocab
        self.n_embd = int(lib.llama_model_n_embd(model.ptr))
        self._embd_batch = None  # a batch of embedding rows (new tokens), made on first use
        self._embeddings = False  # whether llama.cpp also returns the final hidden states
        self._tainted = False  # a batch gave NaN/Inf logits: its keys/values may hold them too

    def set_adapters(self, loras: list, scales: list[float]) -> None:
        lib = llama_cpp()
        if not loras:
            status = lib.llama_set_adapters_lora(self.ptr, None, 0, None)
        else:
            arr = (lib.llama_adapter_lora_p_ctypes * len(loras))(*loras)
            sc = (ctypes.c_float * len(scales))(*scales)
            status = lib.llama_set_adapters_lora(self.ptr, arr, len(loras), sc)
        if status != 0:
            raise EdgeLoraError(
                f"llama.cpp refused the adapter set (status {status})",
                path=self.model.path,
                hint="an adapter may belong to another base model",
            )

    def clear(self) -> None:
        """Forget every cached position. The cells' old bytes stay, as after ``truncate``: attention
        masks them out (zeroing a 2048-position cache took 1-11 ms, on every adapter swap). Only
        after NaN/Inf logits are they zeroed too, since a masked NaN still poisons a plain softmax."""
        llama_cpp().llama_memory_clear(self.memory, self._tainted)
        self._tainted = False

    def truncate(self, keep: int) -> bool:
        """Drop cached positions >= keep; False when the cache cannot cut there (then clear it)."""
        return bool(llama_cpp().llama_memory_seq_rm(self.memory, 0, keep, -1))

    def decode(self, tokens: list[int], start: int, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens at positions start.. ; the last token's logits ``[vocab]`` or all ``[T, vocab]``."""
        lib = llama_cpp()
        self._hidden_states(False)
        if start + len(tokens) > self.n_ctx:
            raise EdgeLoraError(
                f"{start + len(tokens)} tokens exceed the context of {self.n_ctx}",
                hint="raise n_ctx or shorten the prompt",
            )
        rows = []
        for begin in range(0, len(tokens), self.n_batch):
            chunk = tokens[begin : begin + self.n_batch]
            last_chunk = begin + len(chunk) == len(tokens)
            b = self.batch
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = start + begin + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
            status = lib.llama_decode(self.ptr, b)
            if status != 0:
                raise EdgeLoraError(
                    f"llama.cpp failed to evaluate the batch (llama_decode status {status})",
                    path=self.model.path,
                    hint="the context may be full (raise n_ctx) or out of memory",
                )
            if all_logits:
                ptr = _checked_logits(lib.llama_get_logits(self.ptr), self.model.path)
                rows.append(self._noted(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab)).copy()))
        if all_logits:
            return np.concatenate(rows, axis=0)
        ptr = _checked_logits(lib.llama_get_logits_ith(self.ptr, -1), self.model.path)
        return self._noted(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def decode_added(
        self, tokens: list[int], start: int, rows: np.ndarray, head: np.ndarray, all_logits: bool = False
    ) -> np.ndarray:
        """:meth:`decode` for a vocabulary grown by new tokens (ids ``n_vocab + i``): a new token goes in
        as its embedding row ``rows[i]`` (``llama_batch.embd``), and its logit is the final hidden state
        (after the output norm) times ``head[i]``, appended after the model's logits.

        llama.cpp returns the hidden states of every position of a batch once they are switched on,
        so only the positions whose logits are wanted run with them: the last one (alone), or all."""
        if start + len(tokens) > self.n_ctx:
            raise EdgeLoraError(
                f"{start + len(tokens)} tokens exceed the context of {self.n_ctx}",
                hint="raise n_ctx or shorten the prompt",
            )
        n = len(tokens)
        steps = [(0, n, True)] if all_logits else [(0, n - 1, False), (n - 1, n, True)]
        out = []
        for begin, end, wanted in steps:
            self._hidden_states(wanted)
            for run_begin, run_end in _runs(tokens, begin, end, self.n_vocab, self.n_batch):
                out.extend(self._decode_run(tokens[run_begin:run_end], start + run_begin, rows, head, wanted))
        logits = np.stack(out) if all_logits else out[-1]
        return self._noted(logits)

    def _decode_run(
        self, chunk: list[int], pos: int, rows: np.ndarray, head: np.ndarray, wanted: bool
    ) -> list[np.ndarray]:
        """One batch of only base ids or only new ids; with ``wanted``, each position's full logits."""
        lib = llama_cpp()
        new = chunk[0] >= self.n_vocab
        if new and self._embd_batch is None:
            self._embd_batch = lib.llama_batch_init(self.n_batch, self.n_embd, 1)
        b = self._embd_batch if new else self.batch
        b.n_tokens = len(chunk)
        if new:
            data = np.ascontiguousarray(rows[np.asarray(chunk) - self.n_vocab], dtype=np.float32)
            ctypes.memmove(b.embd, data.ctypes.data, data.nbytes)
        for i, tok in enumerate(chunk):
            if not new:
                b.token[i] = tok
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = wanted
        status = lib.llama_decode(self.ptr, b)
        if status != 0:
            raise EdgeLoraError(
                f"llama.cpp failed to evaluate the batch (llama_decode status {status})",
                path=self.model.path,
                hint="the context may be full (raise n_ctx) or out of memory",
            )
        if not wanted:
            return []
        n = len(chunk)
        ptr = _checked_logits(lib.llama_get_logits(self.ptr), self.model.path)
        logits = np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))
        hidden_ptr = lib.llama_get_embeddings(self.ptr)
        if not hidden_ptr:
            raise EdgeLoraError(
                "llama.cpp returned no hidden states for this batch",
                path=self.model.path,
                hint="report this with the bundle",
            )
        hidden = np.ctypeslib.as_array(hidden_ptr, shape=(n, self.n_embd))
        return list(np.concatenate([logits, hidden @ head.T], axis=1))

    def _hidden_states(self, on: bool) -> None:
        if on != self._embeddings:
            llama_cpp().llama_set_embeddings(self.ptr, on)
            self._embeddings = on

    def _noted(self, logits: np.ndarray) -> np.ndarray:
        if not np.isfinite(logits).all():
            self._tainted = True
        return logits

    def free(self) -> None:
        lib = llama_cpp()
        if self.ptr:
            lib.llama_batch_free(self.batch)
            if self._embd_batch is not None:
                lib.llama_batch_free(self._embd_batch)
            lib.llama_free(self.ptr)
            self.ptr = None


def _runs(tokens: list[int], begin: int, end: int, n_vocab: int, n_batch: int) -> list[tuple[int, int]]:
    """``[begin, end)`` cut into batches of only base ids or only new ids, at most ``n_batch`` each."""
    runs, i = [], begin
    while i < end:
        j, new = i + 1, tokens[i] >= n_vocab
        while j < end and j - i < n_batch and (tokens[j] >= n_vocab) == new:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _checked_logits(ptr, path):
    if not ptr:
        raise EdgeLoraError(
            "llama.cpp returned no logits for this batch", path=path, hint="report this with the bundle"
        )
    return ptr


# --- llama.cpp's own tokenizer on a GGUF's vocabulary ------------------------------------------------


def tokenize_with_gguf(
    gguf_path, texts: list[str], *, add_special: bool = False, parse_special: bool = False
) -> list[list[int]]:
    """Token ids from llama.cpp's tokenizer on a GGUF (loaded vocab-only), as its test-tokenizer-0 does."""
    with _llama_cpp_vocab(gguf_path) as (lib, vocab):
        return [_tokenize(lib, vocab, text, add_special, parse_special) for text in texts]


@contextmanager
def _llama_cpp_vocab(gguf_path):
    silence_log(False)
    lib = llama_cpp()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(os.fspath(gguf_path).encode(), params)
    if not model:  # a NULL pointer, not None
        raise EdgeLoraError(
            "llama.cpp could not load this GGUF's vocabulary",
            path=gguf_path,
            hint="re-export the model; the file may be truncated",
        )
    try:
        yield lib, lib.llama_model_get_vocab(model)
    finally:
        lib.llama_model_free(model)


def _tokenize(lib, vocab, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    room = len(data) + 8  # at most one token per byte, plus a space prefix and BOS/EOS
    while True:
        buf = (lib.llama_token * room)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, room, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        if -n <= room:  # llama.cpp's overflow code, not a size
            raise EdgeLoraError(f"llama.cpp could not tokenize a text of {len(data)} bytes", path=None)
        room = -n  # too small: llama.cpp says how many it needs
