"""
Token-bucket rate limits, per key (a client identity or an API key) and
global, on an injected clock.  Limits are per replica: each daemon counts only
what it serves.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
from cachetools import LRUCache
from twisted.internet.interfaces import IReactorTime

MAX_TRACKED_KEYS = 10_000


@attrs.define
class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> Optional[int]:
        """Take one token; ``None`` if there was one, else whole seconds to wait."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return max(1, math.ceil((1 - self.tokens) / self.rate))


def _bucket(rate: float, now: float) -> TokenBucket:
    burst = max(1.0, rate)
    return TokenBucket(rate=rate, burst=burst, tokens=burst, updated=now)


@attrs.define
class RateLimiter:
    """
    Optional global and per-key limits.  The per-key table is bounded: the
    least recently seen keys are forgotten first (which only ever forgives).
    """

    clock: IReactorTime
    per_key_per_sec: Optional[float] = None
    global_per_sec: Optional[float] = None
    max_keys: int = MAX_TRACKED_KEYS
    _global: Optional[TokenBucket] = attrs.field(default=None, init=False)
    _keys: LRUCache[str, TokenBucket] = attrs.field(init=False)

    @_keys.default
    def _key_table(self) -> LRUCache[str, TokenBucket]:
        return LRUCache(maxsize=self.max_keys)

    def check_global(self) -> Optional[int]:
        if self.global_per_sec is None:
            return None
        now = self.clock.seconds()
        if self._global is None:
            self._global = _bucket(self.global_per_sec, now)
        return self._global.take(now)

    def check(self, key: str) -> Optional[int]:
        if self.per_key_per_sec is None:
            return None
        now = self.clock.seconds()
        bucket: Optional[TokenBucket] = self._keys.get(key)  # a hit counts as use: the LRU keeps it
        if bucket is None:
            bucket = self._keys[key] = _bucket(self.per_key_per_sec, now)
        return bucket.take(now)
