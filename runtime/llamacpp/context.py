"""A llama.cpp context (``llama_context``) over a model: its KV cache (one sequence), the adapter set
it runs, and the decoding of token batches into logits; new tokens (ids past the model's
vocabulary) go in as embedding rows and get their logits from the final hidden states.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from edge_lora.errors import EdgeLoraError
from runtime.llamacpp.lib import llama_cpp
from runtime.llamacpp.model import Model


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
    ) -> None:
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
        params.no_perf = True  # no timing counters per decode: nothing here reads them
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

    def save_state(self) -> np.ndarray | None:
        """The sequence's KV state as bytes (``llama_state_seq_get_data``), None when it holds NaN/Inf."""
        if self._tainted:
            return None
        lib = llama_cpp()
        size = lib.llama_state_seq_get_size(self.ptr, 0)
        blob = np.empty(size, np.uint8)
        dst = blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        written = lib.llama_state_seq_get_data(self.ptr, dst, size, 0)
        return blob[:written] if written else None

    def load_state(self, blob: np.ndarray) -> bool:
        """Replace the sequence's KV state with a saved one; False when llama.cpp refuses it (then clear)."""
        lib = llama_cpp()
        lib.llama_memory_clear(self.memory, False)
        done = lib.llama_state_seq_set_data(
            self.ptr, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), blob.nbytes, 0
        )
        return bool(done)

    def truncate(self, keep: int) -> bool:
        """Drop cached positions >= keep; False when the cache cannot cut there (then clear it)."""
        return bool(llama_cpp().llama_memory_seq_rm(self.memory, 0, keep, -1))

    def decode(self, tokens: list[int], start: int, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens at positions start.. ; the last token's logits ``[vocab]`` or all
        ``[T, vocab]``."""
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
            self._decode_batch(b)
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
        self._decode_batch(b)
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

    def _decode_batch(self, batch: object) -> None:
        status = llama_cpp().llama_decode(self.ptr, batch)
        if status != 0:
            raise EdgeLoraError(
                f"llama.cpp failed to evaluate the batch (llama_decode status {status})",
                path=self.model.path,
                hint="the context may be full (raise n_ctx) or out of memory",
            )

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


def _checked_logits(ptr: object, path: Path) -> object:
    if not ptr:
        raise EdgeLoraError(
            "llama.cpp returned no logits for this batch", path=path, hint="report this with the bundle"
        )
    return ptr
