"""Bounded translation cache: least recently used sentences, keyed on model, options and subwords.

The key holds the model's generation (a reloaded model starts afresh), the decoding options (a
frozen `nmt.search.SearchOptions`), the target prefix and the source sentence's subword ids after
the tokenizer's normalisation: two sentences the model cannot tell apart share an entry, and an
entry never answers for a sentence that could be translated differently. Sampled translations are
not cached (a seeded sample depends on its place in the batch).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from serve.metrics import Metrics


class TranslationCache:
    """A thread-safe LRU map from a sentence's key to its `TranslationResult`."""

    def __init__(self, max_entries: int, metrics: Metrics | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.metrics = metrics
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, options: Any, ids: list[int], prefix: str | None = None) -> Hashable | None:
        """The entry of one sentence, or None when its translation must not be cached."""
        if getattr(options, "mode", "beam") == "sample":
            return None
        return (model, options, prefix or "", tuple(ids))

    def get(self, key: Hashable | None) -> Any | None:
        """The cached result (counted as a hit) or None (a miss)."""
        if key is None:
            return None
        with self._lock:
            result = self._entries.get(key)
            if result is not None:
                self._entries.move_to_end(key)
        if self.metrics is not None:
            (self.metrics.cache_hits if result is not None else self.metrics.cache_misses).inc()
        return result

    def put(self, key: Hashable | None, result: Any) -> None:
        if key is None:
            return
        with self._lock:
            self._entries[key] = result
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            size = len(self._entries)
        if self.metrics is not None:
            self.metrics.cache_entries.set(size)

    def __len__(self) -> int:
        return len(self._entries)
