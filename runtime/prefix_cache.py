"""KV prefixes kept across adapter switches: a bounded, least-recently-used store of a backend's saved KV
state, keyed by (adapter set with scales, the tokens it covers).

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
        A stored entry that is a prefix of the new one under the same set is dropped: the new one serves
        every request the old one could."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens or nbytes > self.max_bytes:
            return False
        with self._lock:
            for key in [k for k in self._entries if k[0] == set_key and tokens[: len(k[1])] == k[1]]:
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
        history = tuple(int(t) for t in history)
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

    def drop(self, predicate: Callable[[Hashable], bool]) -> None:
        """Forget every entry whose set key satisfies ``predicate`` (an adapter removed, the base merged)."""
        with self._lock:
            for key in [k for k in self._entries if predicate(k[0])]:
                self._bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self.drop(lambda _key: True)


class PrefixReuse(DecodeState):
    """A request's decode state (one with ``take_kv`` / ``put_kv``, e.g. the ONNX CPU state) that starts
    from the longest prefix the cache holds under its set, and leaves its own KV there when it closes."""

    def __init__(self, state: object, cache: PrefixCache, set_key: Hashable) -> None:
        self.state, self.cache, self.set_key = state, cache, set_key
        self.fed: list[int] = []

    def feed(self, token_ids: list[int]) -> object:
        ids = [int(t) for t in token_ids]
        if not self.fed and len(ids) > 1:
            found = self.cache.best(self.set_key, ids, len(ids) - 1)
            if found is not None:
                n, kv = found
                self.state.put_kv(kv, n)
                self.fed, ids = ids[:n], ids[n:]
        logits = self.state.feed(ids)
        self.fed += ids
        return logits

    def close(self) -> None:
        kv = self.state.take_kv()
        if kv is not None and len(self.fed) == kv[1]:  # a failed feed leaves its positions unknown
            self.cache.put(self.set_key, self.fed, kv, sum(a.nbytes for a in kv[0]))
        self.state.close()
