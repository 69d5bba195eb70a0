"""One sequence's decoding through ONNX Runtime's Python binding: its KV cache and the run of each feed.

The fast variant on the GPU (and on a CPU engine asked for the Python binding) runs through an
IOBinding with the KV cache in preallocated buffers that GroupQueryAttention updates in place
(:class:`SharedKVState`); the portable variant (Concat KV cache) and other providers hand new KV
OrtValues from one run to the next (:class:`OnnxState`). The CPU's own path is
:class:`runtime.onnx.cpu_state.CpuKVState` (the C API).
"""

from __future__ import annotations

import contextlib

import numpy as np

from edge_lora.errors import EdgeLoraError, first_line
from edge_lora.onnx_format import lora_feeds, names
from runtime.engine import DecodeState
from runtime.onnx.cpu_state import BoundState
from runtime.onnx.device import DEVICE_LOCK
from runtime.onnx.request import DecodeSetup, RequestChoice


def decode_error(setup: DecodeSetup, err: Exception) -> EdgeLoraError:
    return EdgeLoraError(f"ONNX Runtime failed during decoding ({first_line(err)})", path=setup.model_path)


class OnnxState(DecodeState):
    """One sequence's KV cache (OrtValues handed from one run to the next) under one adapter set:
    the portable variant's Concat cache, and any variant on a device provider."""

    def __init__(self, setup: DecodeSetup, choice: RequestChoice) -> None:
        self.setup, self.session, self.lora, self.run_options = (
            setup,
            choice.session,
            choice.lora,
            choice.run_options,
        )
        self._owner = choice.owner
        c = setup.config
        empty = np.zeros((1, c.num_key_value_heads, 0, c.head_dim), np.float32)
        self._empty = empty
        self.past = [setup.sessions.value(empty)] * (2 * c.num_hidden_layers)
        self.length = 0
        self.output_names = setup.sessions.output_names
        self.added = choice.added_rows  # new-token rows fed

    def run(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        """Run ``token_ids`` after the cached ones; returns logits ``[1, len(token_ids), vocab]``
        (``[1, 1, vocab]`` with ``last_only``: the head then skips the other positions)."""
        value, c = self.setup.sessions.value, self.setup.config
        ids = np.asarray([token_ids], dtype=np.int64)
        mask = np.ones((1, self.length + ids.shape[1]), dtype=np.int64)
        feeds = {
            names.INPUT_IDS: value(ids),
            names.ATTENTION_MASK: value(mask),
        }
        if self.added:  # new tokens in the set: base ids clamped, and each position's row of the table
            ids, index = lora_feeds.split_added_ids(ids, c.vocab_size)
            feeds[names.INPUT_IDS] = value(ids)
            feeds[names.ADDED_INDEX] = value(index)
        for i in range(c.num_hidden_layers):
            feeds[names.past_key(i)] = self.past[2 * i]
            feeds[names.past_value(i)] = self.past[2 * i + 1]
        feeds.update(self.lora)
        if last_only and self.setup.sessions.keeps_last:
            feeds[names.LOGITS_TO_KEEP] = self.setup.sessions.keep_one
        try:
            outs = self.session.run_with_ort_values(self.output_names, feeds, self.run_options)
        except Exception as err:
            raise decode_error(self.setup, err) from None
        self.past = list(outs[1:])
        self.length = mask.shape[1]
        return outs[0].numpy()

    def feed(self, token_ids: list[int]) -> np.ndarray:
        return self.run(token_ids, last_only=True)[0, -1]

    def feed_all(self, token_ids: list[int]) -> np.ndarray:
        return self.run(token_ids)[0].copy()

    @property
    def host_kv(self) -> bool:
        """Whether its KV values are host memory, which a prefix store can copy (not a device's)."""
        return self.setup.gpu is None

    def take_kv(self) -> tuple[list[np.ndarray], int] | None:
        """Its KV values as arrays (a copy: the store outlives the values); None before the first feed, and
        where another provider left them in its device's memory."""
        if not self.length or any(value.device_name().lower() != "cpu" for value in self.past):
            return None
        return [np.array(value.numpy()) for value in self.past], self.length

    def put_kv(self, kv: tuple[list[np.ndarray], int], n: int) -> None:
        """Start from the first ``n`` positions of a saved state (before the first feed)."""
        arrays, length = kv
        n = min(n, length)
        value = self.setup.sessions.value
        self.past = [value(np.ascontiguousarray(saved[:, :, :n])) for saved in arrays]
        self.length = n

    def adopt(self, previous: DecodeState) -> None:
        """Take over ``previous``'s KV values (the same KV inputs in every session of a variant)."""
        if type(previous) is not type(self) or previous.setup is not self.setup:
            super().adopt(previous)
        self.past, self.length = previous.past, previous.length
        previous.past = []
        previous.close()

    def close(self) -> None:
        self.past = []
        self._owner = None


class SharedKVState(BoundState):
    """One sequence on the fast variant, run through an IOBinding that is set up once (on the CPU,
    or on the GPU with every buffer but the token, the mask and the logits on the device).

    Each layer's K and V live in one buffer ``[1, kv_heads, capacity, head_dim]`` bound as both
    the past input and the present output: GroupQueryAttention sees one pointer and writes the new
    positions in place, so a step copies no cache and allocates nothing. The capacity starts at the
    first feed rounded up to :data:`~runtime.onnx.cpu_state.KV_BLOCK` and doubles (new buffers,
    ``length`` positions copied) when a feed would pass it, never beyond the model's context. LoRA
    inputs are fixed for a state and bound once; the logits land in a preallocated buffer, reused
    while its shape holds. On the GPU the KV buffers are device memory (growth copies them through
    the host, once per doubling), and the LoRA values are the engine's device copies.
    """

    def __init__(self, setup: DecodeSetup, choice: RequestChoice) -> None:
        self.setup, self.session, self.gpu = setup, choice.session, setup.gpu
        self._owner = choice.owner  # the adapter reader whose memory the bound LoRA values point into
        self.binding = choice.session.io_binding()
        with DEVICE_LOCK if self.gpu else contextlib.nullcontext():
            for name, value in choice.lora.items():
                self.binding.bind_ortvalue_input(name, value)
        self.length = self.capacity = 0
        self.cache: list = []  # K0, V0, K1, V1, ...: numpy arrays, or device OrtValues on the GPU
        self.logits: np.ndarray | None = None  # the bound output buffer
        self._token = np.zeros((1, 1), np.int64)  # a one-token feed is written here, bound once
        self._token_value = setup.sessions.value(self._token)
        self._ids_bound = 0  # how many ids the bound input_ids holds
        self._keep = None  # the bound logits_to_keep value
        self._mask = setup.mask_ones.ctypes.data  # masks are [1, total] views of it, bound by pointer
        self.added, self.width = choice.added_rows, setup.logits_width(choice)

    def run(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        """Run ``token_ids`` after the cached ones; returns logits ``[1, len(token_ids), vocab]``
        (``[1, 1, vocab]`` with ``last_only``). The array is the bound output buffer: the next
        run overwrites it, so copy what must outlive that."""
        with (
            DEVICE_LOCK if self.gpu else contextlib.nullcontext()
        ):  # binding a host value copies it to the device
            return self._run(token_ids, last_only)

    def _run(self, token_ids: list[int], last_only: bool) -> np.ndarray:
        setup, n = self.setup, len(token_ids)
        total = self.length + n
        if total > self.capacity:
            self._reserve(total)
        self._bind_ids(token_ids)
        self.binding.bind_input(names.ATTENTION_MASK, "cpu", 0, np.int64, [1, total], self._mask)
        self._bind_logits(1 if last_only and setup.sessions.keeps_last else n, last_only)
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as err:
            raise decode_error(setup, err) from None
        self.length = total  # positions past it that a failed run wrote are overwritten next time
        return self.logits

    def feed(self, token_ids: list[int]) -> np.ndarray:
        # a copy (~4 us for a 49k vocab): callers may keep the logits of several steps
        return self.run(token_ids, last_only=True)[0, -1].copy()

    def close(self) -> None:
        with DEVICE_LOCK if self.gpu else contextlib.nullcontext():  # device buffers are freed here
            self.binding = self._owner = self.logits = None
            self.cache = []

    def _bind_ids(self, token_ids: list[int]) -> None:
        if self.added:  # new tokens in the set: base ids clamped, and each position's row of the table
            ids = np.asarray([token_ids], dtype=np.int64)
            ids, index = lora_feeds.split_added_ids(ids, self.setup.config.vocab_size)
            value = self.setup.sessions.value
            self.binding.bind_ortvalue_input(names.INPUT_IDS, value(ids))
            self.binding.bind_ortvalue_input(names.ADDED_INDEX, value(index))
            self._ids_bound = 0
            return
        if len(token_ids) == 1 and not self.gpu:
            self._token[0, 0] = token_ids[0]  # ORT reads the bound buffer at run time
            if self._ids_bound != 1:
                self.binding.bind_ortvalue_input(names.INPUT_IDS, self._token_value)
        else:
            ids = np.asarray([token_ids], dtype=np.int64)
            self.binding.bind_ortvalue_input(names.INPUT_IDS, self.setup.sessions.value(ids))
        self._ids_bound = len(token_ids)

    def _reserve(self, total: int) -> None:
        """Grow the KV buffers to hold ``total`` positions: double, at least the next block."""
        setup, c = self.setup, self.setup.config
        capacity = self._grown_capacity(total)
        shape = (1, c.num_key_value_heads, capacity, c.head_dim)
        old, self.cache = self.cache, []
        for i, (past, present) in enumerate(setup.cache_names):
            # uninitialized: GroupQueryAttention reads only the positions the mask covers (a test
            # fills the rest with NaN), and zeroing 2048 positions would cost ~2 ms per growth
            if self.gpu:
                value = buffer = self.gpu.empty(shape, np.float32)
                if self.length:
                    host = np.zeros(shape, np.float32)
                    host[:, :, : self.length] = self.gpu.download(old[i])[:, :, : self.length]
                    self.gpu.upload(host, "kv", into=value)
            else:
                buffer = np.empty(shape, np.float32)
                if self.length:
                    buffer[:, :, : self.length] = old[i][:, :, : self.length]
                value = setup.sessions.value(buffer)  # the binding keeps it (and the array) alive
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
            self.cache.append(buffer)
        self.capacity = capacity
