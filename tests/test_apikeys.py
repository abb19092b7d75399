"""API-key text: making, strict parsing at every boundary, constant-time comparison."""

from __future__ import annotations

import hashlib

import pytest

from jwtlet.apikeys import keys as apikeys

SECRET = "s" * 43


def key(prefix: str = "jwtk", integration: str = "acme", key_id: str = "k1", secret: str = SECRET) -> str:
    return f"{prefix}.{integration}.{key_id}.{secret}"


def test_a_made_key_parses_back_and_stores_only_a_digest() -> None:
    made = apikeys.make_key("jwtk", "acme", None, lambda n: bytes(range(n)))
    parsed = apikeys.parse_key(made.text, "jwtk")
    assert parsed is not None
    assert (parsed.integration_id, parsed.key_id) == ("acme", made.key_id)
    assert len(parsed.secret) == 43, "32 random bytes, base64url without padding"
    assert made.secret_sha256 == hashlib.sha256(parsed.secret.encode()).digest()
    assert parsed.secret not in repr(made) and parsed.secret not in repr(parsed)


@pytest.mark.parametrize(
    "text",
    [
        "",
        key(prefix="other"),
        key(integration=""),
        key(key_id=""),
        key(secret=""),
        key() + ".extra",
        "jwtk.acme.k1",
        key(integration="a" * 65),
        key(key_id="k" * 65),
        key(secret="s" * 129),
        key(integration="ä"),
        key(secret="s" * 42 + "é"),
        key(key_id="k/1"),
        key(secret="s" * 42 + "="),
        ("x" * 301),
    ],
)
def test_malformed_keys_are_refused(text: str) -> None:
    assert apikeys.parse_key(text, "jwtk") is None


def test_parts_at_their_caps_are_accepted_and_the_whole_key_is_capped_at_300() -> None:
    at_caps = key(integration="a" * 64, key_id="k" * 64, secret="s" * 128)
    assert len(at_caps) == 4 + 64 + 64 + 128 + 3
    assert apikeys.parse_key(at_caps, "jwtk") is not None
    too_long = key(prefix="p" * 50, integration="a" * 64, key_id="k" * 64, secret="s" * 128)
    assert len(too_long) > 300
    assert apikeys.parse_key(too_long, "p" * 50) is None


def test_the_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = apikeys.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", recording)
    digest = hashlib.sha256(SECRET.encode()).digest()
    assert apikeys.secret_matches(SECRET, digest) is True
    assert apikeys.secret_matches("t" * 43, digest) is False
    assert len(calls) == 2


def test_ids_allow_letters_digits_dash_underscore_only() -> None:
    assert apikeys.valid_id("acme_corp-1")
    assert not apikeys.valid_id("acme.corp") and not apikeys.valid_id("") and not apikeys.valid_id("a" * 65)
