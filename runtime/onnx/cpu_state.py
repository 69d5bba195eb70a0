"""One sequence on the CPU's fast variant through the C API (:class:`CpuKVState`): the KV cache in
buffers that GroupQueryAttention updates in place, every input bound once, a step a few direct calls.
:class:`BoundState` holds what it shares with the Python binding's bound state (the logits buffer,
``logits_to_keep``, how the cache grows)."""

from __future__ import annotations

import contextlib

import numpy as np

from edge_lora.errors import EdgeLoraError, first_line
from edge_lora.onnx_format import lora_feeds, names
from runtime.engine import DecodeState
from runtime.onnx.device import DEVICE_LOCK
from runtime.onnx.ort_capi import OrtError
from runtime.onnx.request import DecodeSetup, RequestChoice

KV_BLOCK = 256  # the cache starts at the first feed rounded up to this, then doubles


class BoundState(DecodeState):
    """A decode state run through an IOBinding (the C API's or the Python binding's; both take
    ``bind_ortvalue_input`` / ``bind_ortvalue_output``): its ``binding``, ``setup``, ``width``,
    ``capacity``, the bound ``logits`` buffer and the bound ``logits_to_keep`` value ``_keep``."""

    def _bind_logits(self, rows: int, last_only: bool) -> None:
        sessions = self.setup.sessions
        if sessions.keeps_last:
            keep = sessions.keep_one if last_only else sessions.keep_all  # the binding keeps the last bound
            if keep is not self._keep:
                self.binding.bind_ortvalue_input(names.LOGITS_TO_KEEP, keep)
                self._keep = keep
        if self.logits is None or self.logits.shape[1] != rows:
            self.logits = np.empty((1, rows, self.width), np.float32)
            self.binding.bind_ortvalue_output(names.LOGITS, sessions.value(self.logits))

    def feed_all(self, token_ids: list[int]) -> np.ndarray:
        return self.run(token_ids)[0].copy()

    def adopt(self, previous: DecodeState) -> None:
        """Take over ``previous``'s KV buffers (same layout: both states of the fast variant), bound to this
        state's binding as they are: nothing is copied."""
        if type(previous) is not type(self) or previous.setup is not self.setup:
            super().adopt(previous)
        gpu = getattr(self, "gpu", None)
        with DEVICE_LOCK if gpu else contextlib.nullcontext():
            for (past, present), buffer in zip(self.setup.cache_names, previous.cache):
                value = buffer if gpu else self.setup.sessions.value(buffer)  # GPU: already device values
                self.binding.bind_ortvalue_input(past, value)
                self.binding.bind_ortvalue_output(present, value)
        self.cache, self.length, self.capacity = previous.cache, previous.length, previous.capacity
        previous.cache = []
        previous.close()

    @property
    def host_kv(self) -> bool:
        """Whether its KV buffers are host arrays, which a prefix store can copy (not device memory)."""
        return not getattr(self, "gpu", None)

    def take_kv(self) -> tuple[list[np.ndarray], int] | None:
        """The positions the KV buffers hold, copied out at their length (a buffer's capacity can be
        twice that: a kept prefix costs only its positions); None before the first feed."""
        if not self.length:
            return None
        return [np.ascontiguousarray(buffer[:, :, : self.length]) for buffer in self.cache], self.length

    def put_kv(self, kv: tuple[list[np.ndarray], int], n: int) -> None:
        """Start from the first ``n`` positions of a saved state (before the first feed)."""
        arrays, length = kv
        n = min(n, length)
        self._reserve(n)
        for buffer, saved in zip(self.cache, arrays):
            buffer[:, :, :n] = saved[:, :, :n]
        self.length = n

    def _grown_capacity(self, total: int) -> int:
        """The capacity that holds ``total`` positions: double, at least the next block, never past the
        context (refused there)."""
        limit = self.setup.max_context
        if total > limit:
            raise EdgeLoraError(f"{total} tokens exceed the context of {limit}", hint="shorten the prompt")
        return min(limit, max(2 * self.capacity, -(-total // KV_BLOCK) * KV_BLOCK))


class CpuKVState(BoundState):
    """Each layer's K and V live in one buffer ``[1, kv_heads, capacity, head_dim]`` bound as both
    the past input and the present output: GroupQueryAttention writes the new positions in place, so
    a step copies no cache and allocates nothing. The capacity starts at the first feed rounded up to
    :data:`KV_BLOCK` and doubles (``length`` positions copied) when a feed would pass it, never beyond
    the model's context. The LoRA inputs are bound once; a one-token feed is written into a bound
    buffer; the attention mask is a bound view of the shared row of ones; the logits land in a
    bound buffer, reused while its shape holds."""

    def __init__(self, setup: DecodeSetup, choice: RequestChoice) -> None:
        self.setup, self.session = setup, choice.session
        self._owner = choice.owner
        self.binding = choice.session.binding()
        for name, value in choice.lora.items():
            self.binding.bind_ortvalue_input(name, value)
        self.length = self.capacity = 0
        self.cache: list[np.ndarray] = []
        self.logits: np.ndarray | None = None
        self._token = np.zeros((1, 1), np.int64)
        self._token_value = setup.sessions.value(self._token)
        self._ids_bound = 0
        self._keep = None
        self.added = choice.added_rows
        self.width = setup.logits_width(choice)

    def run(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        """Run ``token_ids`` after the cached ones; returns logits ``[1, len(token_ids), vocab]``
        (``[1, 1, vocab]`` with ``last_only``). The array is the bound output buffer: the next run
        overwrites it, so copy what must outlive that."""
        setup, n = self.setup, len(token_ids)
        total = self.length + n
        if total > self.capacity:
            self._reserve(total)
        self._bind_ids(token_ids)
        self.binding.bind_ortvalue_input(names.ATTENTION_MASK, setup.sessions.mask(setup.mask_ones, total))
        self._bind_logits(1 if last_only and setup.sessions.keeps_last else n, last_only)
        try:
            self.binding.run()
        except OrtError as err:
            raise EdgeLoraError(
                f"ONNX Runtime failed during decoding ({first_line(err)})", path=setup.model_path
            ) from None
        self.length = total  # positions past it that a failed run wrote are overwritten next time
        return self.logits

    def feed(self, token_ids: list[int]) -> np.ndarray:
        # a copy (~4 us for a 49k vocab): callers may keep the logits of several steps
        return self.run(token_ids, last_only=True)[0, -1].copy()

    def close(self) -> None:
        if self.binding is not None:
            self.binding.close()
        self.binding = self._owner = self.logits = None
        self.cache = []
        self.length = self.capacity = 0

    def _bind_ids(self, token_ids: list[int]) -> None:
        value = self.setup.sessions.value
        if self.added:  # new tokens in the set: base ids clamped, and each position's row of the table
            ids = np.asarray([token_ids], dtype=np.int64)
            ids, index = lora_feeds.split_added_ids(ids, self.setup.config.vocab_size)
            self.binding.bind_ortvalue_input(names.INPUT_IDS, value(ids))
            self.binding.bind_ortvalue_input(names.ADDED_INDEX, value(index))
            self._ids_bound = 0
        elif len(token_ids) == 1:
            self._token[0, 0] = token_ids[0]  # ORT reads the bound buffer at run time
            if self._ids_bound != 1:
                self.binding.bind_ortvalue_input(names.INPUT_IDS, self._token_value)
            self._ids_bound = 1
        else:
            self.binding.bind_ortvalue_input(names.INPUT_IDS, value(np.asarray([token_ids], dtype=np.int64)))
            self._ids_bound = len(token_ids)

    def _reserve(self, total: int) -> None:
        """Grow the KV buffers to hold ``total`` positions: double, at least the next block."""
        setup, c = self.setup, self.setup.config
        capacity = self._grown_capacity(total)
        shape = (1, c.num_key_value_heads, capacity, c.head_dim)
        old, self.cache = self.cache, []
        for i, (past, present) in enumerate(setup.cache_names):
            # uninitialized: GroupQueryAttention reads only the positions the mask covers
            buffer = np.empty(shape, np.float32)
            if self.length:
                buffer[:, :, : self.length] = old[i][:, :, : self.length]
            value = setup.sessions.value(buffer)  # the binding holds it (and the array) until rebound
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
            self.cache.append(buffer)
        self.capacity = capacity
