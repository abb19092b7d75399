"""Token buckets on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from jwtlet.ratelimit import RateLimiter


def test_no_limits_configured_never_limits() -> None:
    limiter = RateLimiter(Clock())
    assert all(limiter.check_global() is None and limiter.check("a") is None for _ in range(1000))


def test_per_key_limit_with_retry_after_and_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, per_key_per_sec=2)
    assert [limiter.check("a") for _ in range(3)] == [None, None, 1]
    assert limiter.check("b") is None, "keys are limited separately"
    clock.advance(0.5)
    assert limiter.check("a") is None
    assert limiter.check("a") == 1


def test_slow_rates_tell_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, global_per_sec=0.1)
    assert limiter.check_global() is None
    assert limiter.check_global() == 10
    clock.advance(10)
    assert limiter.check_global() is None


def test_the_key_table_is_bounded() -> None:
    limiter = RateLimiter(Clock(), per_key_per_sec=1, max_keys=3)
    for key in "abcdef":
        limiter.check(key)
    assert list(limiter._keys) == ["d", "e", "f"]
