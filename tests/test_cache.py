"""The two bounded caches: entries that expire on the injected clock, and answers a change makes stale."""

from __future__ import annotations

from twisted.internet.task import Clock

from jwtlet.cache import ChangeAwareCache, ExpiringCache


def test_an_entry_is_served_strictly_before_its_deadline_and_never_after() -> None:
    clock = Clock()
    cache: ExpiringCache[str, str] = ExpiringCache(10, clock)
    cache.put("token", "identity", until=5)
    clock.advance(4.999)
    assert cache.get("token") == "identity"
    clock.advance(0.001)
    assert cache.get("token") is None


def test_an_entry_already_past_its_deadline_is_not_stored() -> None:
    clock = Clock()
    clock.advance(100)
    cache: ExpiringCache[str, str] = ExpiringCache(10, clock)
    cache.put("token", "identity", until=100)
    assert cache.get("token") is None and len(cache) == 0


def test_a_full_expiring_cache_forgets_the_least_recently_used_entry() -> None:
    clock = Clock()
    cache: ExpiringCache[str, int] = ExpiringCache(2, clock)
    cache.put("a", 1, until=60)
    cache.put("b", 2, until=60)
    assert cache.get("a") == 1
    cache.put("c", 3, until=60)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_an_answer_read_before_a_change_is_not_stored_after_it() -> None:
    """A resolve reads, the mapping is deleted (the cache emptied), then the resolve tries to store what it read."""
    cache: ChangeAwareCache[str, str] = ChangeAwareCache(10)
    read_under = cache.generation
    cache.invalidate()
    cache.put("mapping", "deleted meanwhile", read_under)
    assert cache.get("mapping") is None
    cache.put("mapping", "read after the change", cache.generation)
    assert cache.get("mapping") == "read after the change"


def test_a_change_empties_the_cache_and_its_size_is_bounded() -> None:
    cache: ChangeAwareCache[int, int] = ChangeAwareCache(3)
    for key in range(5):
        cache.put(key, key, cache.generation)
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == 4
    cache.invalidate()
    assert len(cache) == 0
