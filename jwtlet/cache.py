"""
The bounded caches jwtlet keeps, all on cachetools: the two shapes that need
more than a plain ``cachetools.LRUCache``.

- :class:`ExpiringCache`: each entry carries its own deadline (a validated
  token is remembered until its ``exp`` at the latest, a target-cluster token
  until shortly before it expires), read from the injected clock.
- :class:`ChangeAwareCache`: answers read from a store that can change under
  them; an answer read before a change must not be stored after it.

Both are bounded LRUs: when full, the least recently used entry goes, which
only ever costs a recomputation.
"""

from __future__ import annotations

from typing import Generic, Hashable, Optional, TypeVar

import attrs
from cachetools import LRUCache, TLRUCache
from twisted.internet.interfaces import IReactorTime

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@attrs.frozen
class _Expiring(Generic[V]):
    value: V
    until: float


class ExpiringCache(Generic[K, V]):
    """
    An LRU of at most ``maxsize`` entries, each usable strictly before its own
    ``until`` on ``clock`` and invisible from then on.
    """

    def __init__(self, maxsize: int, clock: IReactorTime):
        self._entries: TLRUCache[K, _Expiring[V]] = TLRUCache(
            maxsize=maxsize, ttu=lambda _key, entry, _now: entry.until, timer=clock.seconds
        )

    def get(self, key: K) -> Optional[V]:
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def put(self, key: K, value: V, until: float) -> None:
        """Remember ``value`` until ``until``; one already past it is not stored at all."""
        self._entries[key] = _Expiring(value, until)

    def __len__(self) -> int:
        return len(self._entries)


class ChangeAwareCache(Generic[K, V]):
    """
    An LRU of at most ``maxsize`` answers, emptied by :meth:`invalidate` on
    every change.  A reader notes :attr:`generation` before it reads and hands
    it to :meth:`put`: an answer read under an older generation may predate a
    change that already emptied the cache, so it is dropped, not stored.
    """

    def __init__(self, maxsize: int):
        self._entries: LRUCache[K, V] = LRUCache(maxsize=maxsize)
        #: bumped by every :meth:`invalidate`
        self.generation = 0

    def get(self, key: K) -> Optional[V]:
        found: Optional[V] = self._entries.get(key)
        return found

    def put(self, key: K, value: V, read_under: int) -> None:
        if read_under == self.generation:
            self._entries[key] = value

    def invalidate(self) -> None:
        self.generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
