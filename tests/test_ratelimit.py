"""Token buckets on a fake clock, and what the token port counts against them."""

from __future__ import annotations

from pathlib import Path

from apps import WORKLOAD, Apps, Reply, call, make_apps
from twisted.internet.task import Clock

from jwtlet import policy
from jwtlet.model import ResourceMapping
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


def test_the_key_table_forgets_the_least_recently_seen_key_first() -> None:
    """A key still sending keeps its bucket (and its debt) while quieter keys push the table past its bound."""
    limiter = RateLimiter(Clock(), per_key_per_sec=1, max_keys=2)
    assert limiter.check("busy") is None
    assert limiter.check("busy") == 1
    limiter.check("quiet-1")
    assert limiter.check("busy") == 1, "seen again: most recent"
    limiter.check("quiet-2")
    assert sorted(limiter._keys) == ["busy", "quiet-2"]
    assert limiter.check("busy") == 1, "its bucket was kept, still empty"


def exchange(apps: Apps, subject_token: str) -> Reply:
    form = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": subject_token, "resource": "ctx"}
    return call(apps.token, "POST", "http://jwtlet.test/token", data=form)


def test_a_flood_of_garbage_tokens_does_not_use_up_the_global_budget_of_valid_clients(tmp_path: Path) -> None:
    """
    An attacker sends a hundred forged subject tokens within one second under
    a global limit of one exchange a second: each is refused as a bad grant,
    and the valid client that comes next still gets its token.
    """
    apps = make_apps(tmp_path, {"rate_limits": {"global_per_sec": 1}})
    apps.store().add_mapping(ResourceMapping(WORKLOAD.username, "ctx"))
    refused = {(reply.code, reply.json()["error"]) for reply in
               (exchange(apps, f"forged-{index}") for index in range(100))}
    assert refused == {(400, "invalid_grant")}
    assert exchange(apps, "token-workload").code == 200
    limited = exchange(apps, "token-workload")
    assert (limited.code, limited.json()["error"]) == (429, "rate_limited"), "the global limit still holds"
