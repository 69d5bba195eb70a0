"""KV prefixes kept across adapter switches: a bounded, least-recently-used store of a backend's saved KV
state, keyed by (a set key, the positions it covers). A position is whatever the backend compares (the
ONNX engine: a token id, its set in the set key; llama.cpp: a token with its set's identity, since one
state there can hold positions of several sets, as an activated adapter's request does).

A request whose set was not the last one's does not start from nothing: the longest stored prefix of its
tokens under its own set is restored, and only the rest is evaluated. What a backend saves is its own
business (llama.cpp: one sequence's state, ``llama_state_seq_get_data``); this class only decides what is
kept. The bound is in bytes, set by the app; an entry larger than the whole bound is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.engine import DecodeState


@dataclass
class PrefixStats:
    saved: int = 0  # entries stored
    hits: int = 0  # lookups that restored a prefix
    misses: int = 0
    evicted: int = 0
    tokens_reused: int = 0  # positions restored instead of evaluated

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    blob: object  # the backend's saved state
    nbytes: int


@dataclass
class PrefixCache:
    max_bytes: int
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[tuple[Hashable, tuple[int, ...]], _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, set_key: Hashable, tokens: Sequence[int], blob: object, nbytes: int) -> bool:
        """Keep ``blob`` (the state after ``tokens`` under ``set_key``); False when it cannot fit at all.
        A stored entry under the same set that shares at least three quarters of its positions with the
        new one is dropped: the new one serves nearly all it could (requests on one system prompt would
        otherwise each keep a copy of it; an entry that is a prefix of the new one is the extreme case)."""
        tokens = tuple(tokens)
        if not tokens or nbytes > self.max_bytes:
            return False
        with self._lock:
            for key in [k for k in self._entries if k[0] == set_key and _covered(k[1], tokens)]:
                self._bytes -= self._entries.pop(key).nbytes
            self._entries[(set_key, tokens)] = _Entry(tokens, blob, nbytes)
            self._bytes += nbytes
            self.stats.saved += 1
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.stats.evicted += 1
        return True

    def best(self, set_key: Hashable, history: Sequence[int], limit: int) -> tuple[int, object] | None:
        """The stored state under ``set_key`` sharing the longest prefix with ``history`` (at most ``limit``
        tokens): ``(that length, its blob)``, now the most recently used; None when none shares a token.
        The blob may cover more tokens than that length: the caller cuts the state back to it."""
        history = tuple(history)
        with self._lock:
            found = None
            for key, entry in self._entries.items():
                if key[0] != set_key:
                    continue
                n, stop = 0, min(len(entry.tokens), limit)
                while n < stop and entry.tokens[n] == history[n]:
                    n += 1
                if n and (found is None or n > found[0]):
                    found = (n, key, entry)
            if found is None:
                self.stats.misses += 1
                return None
            n, key, entry = found
            self._entries.move_to_end(key)
            self.stats.hits += 1
            self.stats.tokens_reused += n
            return n, entry.blob

    def drop(self, predicate: Callable[[tuple[Hashable, tuple]], bool]) -> None:
        """Forget every entry whose ``(set key, tokens)`` satisfies ``predicate`` (an adapter removed, the
        base merged)."""
        with self._lock:
            for key in [k for k in self._entries if predicate(k)]:
                self._bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self.drop(lambda _entry: True)


def _covered(old: tuple, new: tuple) -> bool:
    """Whether ``new`` shares at least three quarters of ``old``'s positions from the start."""
    n, stop = 0, min(len(old), len(new))
    while n < stop and old[n] == new[n]:
        n += 1
    return 4 * n >= 3 * len(old)


class PrefixReuse(DecodeState):
    """A request's decode state (one with ``take_kv`` / ``put_kv``, e.g. the ONNX CPU state) that starts
    from the longest prefix the cache holds under its set, and leaves its own KV there when it closes."""

    def __init__(self, state: object, cache: PrefixCache, set_key: Hashable) -> None:
        self.state, self.cache, self.set_key = state, cache, set_key
        self.fed: list[int] = []
        # the segments before this state's (activated adapters): (their set key, how many positions)
        self.earlier: list[tuple[Hashable, int]] = []

    def feed(self, token_ids: list[int]) -> object:
        ids = self._restore([int(t) for t in token_ids], 1)  # the store compares positions as plain ints
        logits = self.state.feed(ids)
        self.fed += ids
        return logits

    def prefill(self, token_ids: list[int]) -> None:
        ids = self._restore([int(t) for t in token_ids], 0)
        if ids:
            self.state.prefill(ids)
            self.fed += ids

    def _restore(self, ids: list[int], keep: int) -> list[int]:
        """On the first feed, the longest stored prefix of ``ids`` leaving at least ``keep`` of them to
        evaluate; returns those left."""
        if self.fed or len(ids) <= keep:
            return ids
        found = self.cache.best(self.set_key, ids, len(ids) - keep)
        if found is None:
            return ids
        n, kv = found
        self.state.put_kv(kv, n)
        self.fed = ids[:n]
        return ids[n:]

    def feed_all(self, token_ids: list[int]) -> object:
        logits = self.state.feed_all(token_ids)
        self.fed += [int(t) for t in token_ids]
        return logits

    def adopt(self, previous: DecodeState) -> None:
        """Go on from ``previous``'s positions (an activated adapter's segment after the base's): its
        buffers become this state's, and when this one closes, those first positions are left in the store
        under ``previous``'s set too (where the next request's first segment finds them), off the path to
        this request's first token."""
        wrapped = isinstance(previous, PrefixReuse)
        self.state.adopt(previous.state if wrapped else previous)
        self.fed = list(previous.fed) if wrapped else []  # unwrapped: its tokens are unknown, nothing stored
        if wrapped:
            self.earlier = [*previous.earlier, (previous.set_key, len(previous.fed))]

    def _leave(self) -> None:
        """Its KV into the store (a copy at its length; the earlier segments' positions under their sets
        too), the state left open."""
        kv = self.state.take_kv()
        if kv is None or len(self.fed) != kv[1]:  # a failed feed leaves its positions unknown
            return
        for set_key, n in self.earlier:
            part = [np.ascontiguousarray(a[:, :, :n]) for a in kv[0]]
            self.cache.put(set_key, self.fed[:n], (part, n), sum(a.nbytes for a in part))
        self.cache.put(self.set_key, self.fed, kv, sum(a.nbytes for a in kv[0]))

    def close(self) -> None:
        self._leave()  # nothing when its positions went to another state (adopt) or it is closed
        self.state.close()
