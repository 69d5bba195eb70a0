"""ctypes binding of ``libedge_lora`` (native/, include/edge_lora.h): the C library apps embed.

Not a backend of :func:`runtime.load`: the Python runtime stays pure Python over llama-cpp-python.
This binding is how the tests hold the library to the Python runtime (same tokens, same logits,
same one-line errors) and how the benchmarks time it. ``scripts/native-build.sh`` builds the library.

    lib = NativeLibrary("/path/to/libedge_lora.so")
    with lib.open("bundle/", precise=True) as engine:
        engine.add_adapter("sql")
        ids = engine.generate([5, 17, 42], {"sql": 1.0}, max_new_tokens=16)
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence

import numpy as np

from edge_lora.errors import EdgeLoraError

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int32, ctypes.c_void_p)


class _Params(ctypes.Structure):
    _fields_ = [
        ("quant", ctypes.c_char_p),
        ("n_threads", ctypes.c_int32),
        ("n_ctx", ctypes.c_int32),
        ("n_ctx_start", ctypes.c_int32),
        ("n_batch", ctypes.c_int32),
        ("verify_hashes", ctypes.c_int),
        ("precise", ctypes.c_int),
        ("trusted_keys", ctypes.POINTER(ctypes.c_char_p)),
        ("n_trusted_keys", ctypes.c_size_t),
    ]


class _Scale(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("scale", ctypes.c_float)]


class _Sampling(ctypes.Structure):
    _fields_ = [
        ("max_new_tokens", ctypes.c_int32),
        ("temperature", ctypes.c_float),
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("repetition_penalty", ctypes.c_float),
        ("seed", ctypes.c_uint64),
        ("stop_token_ids", ctypes.POINTER(ctypes.c_int32)),
        ("n_stop_token_ids", ctypes.c_size_t),
    ]


class NativeError(EdgeLoraError):
    """An error the library returned: its status name and its one-line message."""

    def __init__(self, status: str, message: str):
        self.status = status
        super().__init__(message)


class NativeLibrary:
    def __init__(self, path: str | os.PathLike | None = None):
        path = path or os.environ.get("EDGE_LORA_NATIVE_LIB")
        if not path:
            raise EdgeLoraError(
                "no path to libedge_lora",
                hint="build it with scripts/native-build.sh and set EDGE_LORA_NATIVE_LIB",
            )
        lib = ctypes.CDLL(os.fspath(path))
        p, c = ctypes.POINTER, ctypes
        sig = {
            "el_version": ([], c.c_char_p),
            "el_last_error": ([], c.c_char_p),
            "el_status_name": ([c.c_int], c.c_char_p),
            "el_engine_default_params": ([], _Params),
            "el_sampling_default": ([], _Sampling),
            "el_engine_open": ([c.c_char_p, p(_Params), p(c.c_void_p)], c.c_int),
            "el_engine_free": ([c.c_void_p], None),
            "el_engine_add_adapter": ([c.c_void_p, c.c_char_p, c.c_char_p], c.c_int),
            "el_engine_remove_adapter": ([c.c_void_p, c.c_char_p], c.c_int),
            "el_engine_n_adapters": ([c.c_void_p], c.c_int32),
            "el_engine_adapter_invocation": (
                [c.c_void_p, c.c_char_p, p(c.c_int32), c.c_size_t, p(c.c_size_t)],
                c.c_int,
            ),
            "el_engine_n_evaluated": ([c.c_void_p], c.c_int64),
            "el_engine_set_adapters": ([c.c_void_p, p(_Scale), c.c_size_t], c.c_int),
            "el_engine_n_vocab": ([c.c_void_p, p(_Scale), c.c_size_t, p(c.c_int32)], c.c_int),
            "el_engine_tokenize": (
                [c.c_void_p, c.c_char_p, c.c_int, p(c.c_int32), c.c_size_t, p(c.c_size_t)],
                c.c_int,
            ),
            "el_engine_logits": (
                [c.c_void_p, p(c.c_int32), c.c_size_t, p(_Scale), c.c_size_t, p(c.c_float), c.c_size_t],
                c.c_int,
            ),
            "el_engine_generate": (
                [
                    c.c_void_p,
                    p(c.c_int32),
                    c.c_size_t,
                    p(_Scale),
                    c.c_size_t,
                    p(_Sampling),
                    _CALLBACK,
                    c.c_void_p,
                    p(c.c_int32),
                    c.c_size_t,
                    p(c.c_size_t),
                ],
                c.c_int,
            ),
        }
        for name, (args, res) in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        self.lib = lib
        self.path = os.fspath(path)

    @property
    def version(self) -> str:
        return self.lib.el_version().decode()

    def check(self, status: int) -> None:
        if status != 0:
            raise NativeError(self.lib.el_status_name(status).decode(), self.lib.el_last_error().decode())

    def open(
        self,
        bundle: str | os.PathLike,
        *,
        quant: str | None = None,
        threads: int = 0,
        n_ctx: int = 0,
        precise: bool = False,
        verify_hashes: bool = True,
        trusted_keys: Sequence[str | os.PathLike] | None = None,
    ) -> NativeEngine:
        params = self.lib.el_engine_default_params()
        keep = []  # the bytes the params point at, alive through the call
        if quant:
            keep.append(quant.encode())
            params.quant = keep[-1]
        params.n_threads, params.n_ctx = int(threads), int(n_ctx)
        params.precise, params.verify_hashes = int(precise), int(verify_hashes)
        if trusted_keys is not None:
            keys = (ctypes.c_char_p * (len(trusted_keys) + 1))(*[os.fsencode(k) for k in trusted_keys], None)
            keep.append(keys)
            params.trusted_keys = keys
            params.n_trusted_keys = len(trusted_keys)
        handle = ctypes.c_void_p()
        self.check(self.lib.el_engine_open(os.fsencode(bundle), ctypes.byref(params), ctypes.byref(handle)))
        return NativeEngine(self, handle)


def _set(adapters: dict[str, float] | None) -> tuple[object, int]:
    """A set as the C API takes it: None = the default set, {} = the base alone."""
    if adapters is None:
        return None, 0
    items = (_Scale * (len(adapters) + 1))(*[_Scale(n.encode(), float(s)) for n, s in adapters.items()])
    return items, len(adapters)


class NativeEngine:
    def __init__(self, library: NativeLibrary, handle: ctypes.c_void_p):
        self._lib, self._c, self.handle = library, library.lib, handle

    def __enter__(self) -> NativeEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.handle:
            self._c.el_engine_free(self.handle)
            self.handle = None

    def add_adapter(self, name: str, path: str | os.PathLike | None = None) -> None:
        self._lib.check(self._c.el_engine_add_adapter(self.handle, name.encode(), path and os.fsencode(path)))

    def remove_adapter(self, name: str) -> None:
        self._lib.check(self._c.el_engine_remove_adapter(self.handle, name.encode()))

    @property
    def n_adapters(self) -> int:
        return self._c.el_engine_n_adapters(self.handle)

    def invocation(self, name: str) -> list[int]:
        """An activated adapter's (aLoRA) invocation token ids; [] for an ordinary adapter."""
        n = ctypes.c_size_t()
        status = self._c.el_engine_adapter_invocation(self.handle, name.encode(), None, 0, ctypes.byref(n))
        if status != 1:  # EL_ERR_ARGUMENT: more ids than the capacity of 0, their count in n
            self._lib.check(status)
            return []
        buf = (ctypes.c_int32 * n.value)()
        self._lib.check(
            self._c.el_engine_adapter_invocation(self.handle, name.encode(), buf, n.value, ctypes.byref(n))
        )
        return list(buf)

    @property
    def evaluated_positions(self) -> int:
        """Positions llama.cpp evaluated (the Python engine's info()['evaluated_positions'])."""
        return self._c.el_engine_n_evaluated(self.handle)

    def set_adapters(self, adapters: dict[str, float]) -> None:
        items, n = _set(adapters)
        self._lib.check(self._c.el_engine_set_adapters(self.handle, items if n else (_Scale * 1)(), n))

    def n_vocab(self, adapters: dict[str, float] | None = None) -> int:
        items, n = _set(adapters if adapters is not None else {})
        out = ctypes.c_int32()
        self._lib.check(self._c.el_engine_n_vocab(self.handle, items, n, ctypes.byref(out)))
        return out.value

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode()
        buf = (ctypes.c_int32 * (len(data) + 8))()
        n = ctypes.c_size_t()
        special = int(add_special)
        status = self._c.el_engine_tokenize(self.handle, data, special, buf, len(buf), ctypes.byref(n))
        self._lib.check(status)
        return list(buf[: n.value])

    def logits(self, ids: Sequence[int], adapters: dict[str, float] | None = None) -> np.ndarray:
        items, n = _set(adapters if adapters is not None else {})
        vocab = self.n_vocab(adapters)
        arr = (ctypes.c_int32 * len(ids))(*ids)
        out = np.empty((len(ids), vocab), np.float32)
        dest = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self._lib.check(self._c.el_engine_logits(self.handle, arr, len(ids), items, n, dest, out.size))
        return out

    def generate(
        self,
        prompt: Sequence[int],
        adapters: dict[str, float] | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
        on_token: Callable[[int], bool] | None = None,
    ) -> list[int]:
        """Token ids; ``adapters=None`` the default set, ``{}`` the base alone. ``on_token`` returning
        True cancels (a NativeError with status "cancelled", the tokens so far on it as ``.tokens``)."""
        items, n = _set(adapters)
        if adapters is not None and not n:
            items = (_Scale * 1)()  # non-NULL and empty: the base alone
        s = self._c.el_sampling_default()
        s.max_new_tokens, s.temperature, s.top_k, s.top_p = max_new_tokens, temperature, top_k, top_p
        s.repetition_penalty, s.seed = repetition_penalty, seed
        stops = (ctypes.c_int32 * max(1, len(stop_token_ids)))(*stop_token_ids)
        s.stop_token_ids, s.n_stop_token_ids = stops, len(stop_token_ids)
        callback = _CALLBACK(lambda token, _: int(bool(on_token(token)))) if on_token else _CALLBACK()
        arr = (ctypes.c_int32 * max(1, len(prompt)))(*prompt)
        out = (ctypes.c_int32 * max(1, max_new_tokens))()
        got = ctypes.c_size_t()
        status = self._c.el_engine_generate(
            self.handle,
            arr,
            len(prompt),
            items,
            n,
            ctypes.byref(s),
            callback,
            None,
            out,
            max_new_tokens,
            ctypes.byref(got),
        )
        tokens = list(out[: got.value])
        try:
            self._lib.check(status)
        except NativeError as err:
            err.tokens = tokens
            raise
        return tokens
