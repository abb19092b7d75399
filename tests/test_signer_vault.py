"""
The vault-transit signer against the fake Vault over loopback: every key type
through the signer conformance suite, the PSS salt-length trap, rotation,
token files, Kubernetes login and renewal, outages and recovery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import jwt as pyjwt
import pytest
import pytest_twisted
from jwcrypto.jwk import JWK
from twisted.internet.task import Clock
from vault_fixtures import ROOT, RunningVault, build_signer, running_vault, signer_context

from jwtlet.interfaces import DependencyUnavailable, PluginConfigError
from jwtlet.outbound import close_http_client
from jwtlet.plugins.vault_transit import (
    KeyVersion,
    VaultMisconfigured,
    parse_creation_time,
    parse_options,
    signing_version,
    vault_transit,
)
from jwtlet.testing.signer_conformance import assert_signer_conforms
from jwtlet.testing.vault import TransitKey


@pytest_twisted.async_yield_fixture
async def vault() -> AsyncIterator[RunningVault]:
    async for running in running_vault():
        yield running


async def stopped(signer: Any) -> None:
    await signer.stopService()


@pytest.mark.parametrize(
    "key_type, rsa_algorithm, alg",
    [
        ("ed25519", "RS256", "EdDSA"),
        ("ecdsa-p256", "RS256", "ES256"),
        ("ecdsa-p384", "RS256", "ES384"),
        ("rsa-2048", "RS256", "RS256"),
        ("rsa-2048", "PS256", "PS256"),
        ("rsa-3072", "PS256", "PS256"),
        ("rsa-4096", "RS256", "RS256"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_every_key_type_conforms(tmp_path: Path, vault: RunningVault, key_type: str, rsa_algorithm: str,
                                       alg: str) -> None:
    signer = build_signer(tmp_path, vault, key_type=key_type, rsa_algorithm=rsa_algorithm)
    try:
        tokens = await assert_signer_conforms(signer)
        assert signer.algorithm == alg
        assert {pyjwt.get_unverified_header(t)["kid"] for t in tokens} == {"jwt-1"}
        assert vault.fake.keys["jwt"].type == key_type, "created on 404 with the configured type"
        assert vault.fake.last_sign_request["key_version"] == 1, "key_version is always sent"
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_client_forgetting_salt_length_would_make_unverifiable_ps256(
    tmp_path: Path, vault: RunningVault
) -> None:
    signer = build_signer(tmp_path, vault, key_type="rsa-2048", rsa_algorithm="PS256")
    try:
        await assert_signer_conforms(signer)
        assert vault.fake.last_sign_request["salt_length"] == "hash"
        from jwtlet.plugins import vault_transit

        careless = dict(vault_transit.sign_parameters("rsa-2048", "PS256"))
        careless.pop("salt_length")
        original = vault_transit.sign_parameters
        vault_transit.sign_parameters = lambda *_: careless  # type: ignore[assignment]
        try:
            token = await signer.sign({"typ": "JWT"}, {"sub": "x"})
        finally:
            vault_transit.sign_parameters = original
        jwks = await signer.public_jwks()
        with pytest.raises(pyjwt.InvalidSignatureError):
            pyjwt.decode(token, pyjwt.PyJWK.from_dict(jwks["keys"][0]), algorithms=["PS256"])
    finally:
        await stopped(signer)


async def issue(signer: Any) -> str:
    """Sign a token, check it against the JWKS of that moment, and return its kid."""
    token = await signer.sign({"typ": "JWT"}, {"sub": "x"})
    published = {k["kid"]: k for k in (await signer.public_jwks())["keys"]}
    kid = pyjwt.get_unverified_header(token)["kid"]
    pyjwt.decode(token, pyjwt.PyJWK.from_dict(published[kid]), algorithms=[signer.algorithm])
    return str(kid)


async def published_kids(signer: Any) -> list[str]:
    return [k["kid"] for k in (await signer.public_jwks())["keys"]]


@pytest_twisted.ensureDeferred
async def test_rotation_publishes_at_once_signs_after_publish_before_use_and_keeps_old_versions(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    vault.fake.clock = clock
    vault.fake.create_key("jwt")
    signer = build_signer(tmp_path, vault, clock, token_ttl=600, publish_before_use_secs=30, key_refresh_secs=10)
    try:
        assert await issue(signer) == "jwt-1", "a key with one version signs with it, however new"
        clock.advance(100)
        vault.fake.keys["jwt"].rotate()
        await signer.refresh()
        assert await published_kids(signer) == ["jwt-2", "jwt-1"], "the new version is published at once"
        clock.advance(29)
        assert await issue(signer) == "jwt-1", "the previous version signs until publish_before_use_secs passed"
        clock.advance(1.5)
        assert await issue(signer) == "jwt-2"
        clock.advance(599)
        assert await published_kids(signer) == ["jwt-2", "jwt-1"], "kept while a token it signed may be valid"
        clock.advance(1)
        assert await published_kids(signer) == ["jwt-2"], "dropped once every token it signed has expired"
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_signer_started_seconds_after_a_rotation_still_signs_with_the_previous_version(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    """A restart must not sign with a version other replicas may not publish yet: Vault's creation_time decides."""
    vault.fake.clock = clock
    vault.fake.create_key("jwt")
    clock.advance(3600)
    vault.fake.keys["jwt"].rotate()
    clock.advance(5)
    signer = build_signer(tmp_path, vault, clock, key_refresh_secs=10)
    try:
        assert signer.options.publish_before_use_secs == 20, "default: twice key_refresh_secs"
        assert await issue(signer) == "jwt-1"
        assert await published_kids(signer) == ["jwt-2", "jwt-1"]
        clock.advance(14)
        assert await issue(signer) == "jwt-1"
        clock.advance(1.5)
        assert await issue(signer) == "jwt-2"
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_version_without_creation_time_waits_from_when_this_process_first_saw_it(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    vault.fake.clock = clock
    key = vault.fake.create_key("jwt")
    clock.advance(3600)
    key.rotate()
    clock.advance(3600)
    listed = key.read()["keys"]
    del listed["2"]["creation_time"]
    signer = build_signer(tmp_path, vault, clock, publish_before_use_secs=30)
    try:
        signer.observe({int(version): entry for version, entry in listed.items()})
        assert signer.signing_version(clock.seconds()).version == 1
        clock.advance(31)
        assert signer.signing_version(clock.seconds()).version == 2
    finally:
        await stopped(signer)


def test_the_signing_version_respects_min_encryption_version_and_prefers_the_longest_published() -> None:
    versions = [KeyVersion(n, JWK.generate(kty="OKP", crv="Ed25519"), created) for n, created in
                ((1, 0.0), (2, 1000.0), (3, 1010.0))]
    assert signing_version(versions, 0, 30, 1020).version == 1, "2 and 3 are too new"
    assert signing_version(versions, 0, 30, 1035).version == 2
    assert signing_version(versions, 0, 30, 1040).version == 3
    assert signing_version(versions, 2, 30, 1020).version == 2, "Vault refuses to sign with 1: the oldest allowed"
    assert signing_version([], 0, 30, 1020) is None


@pytest.mark.parametrize("text, expected", [
    ("2024-05-01T10:00:00.123456789Z", 1714557600.123456),
    ("2024-05-01T10:00:00Z", 1714557600.0),
    ("2024-05-01T12:00:00.5+02:00", 1714557600.5),
    ("2024-05-01T10:00:00", None),
    ("yesterday", None),
    (1714557600, None),
    (None, None),
])
def test_creation_time_is_read_as_vault_writes_it(text: Any, expected: Any) -> None:
    assert parse_creation_time(text) == expected


def test_publish_before_use_defaults_to_twice_the_refresh_interval() -> None:
    base = {"url": "https://vault:8200", "token": "t"}
    assert parse_options(base, dev=False).publish_before_use_secs == 120
    assert parse_options(dict(base, key_refresh_secs=15), dev=False).publish_before_use_secs == 30
    assert parse_options(dict(base, publish_before_use_secs=None), dev=False).publish_before_use_secs == 120
    assert parse_options(dict(base, publish_before_use_secs=0), dev=False).publish_before_use_secs == 0


@pytest_twisted.ensureDeferred
async def test_rotation_under_traffic_never_yields_an_unverifiable_token(tmp_path: Path, vault: RunningVault) -> None:
    signer = build_signer(tmp_path, vault, key_type="ecdsa-p256", publish_before_use_secs=0)
    try:
        for version in range(1, 5):
            assert [await issue(signer) for _ in range(5)] == [f"jwt-{version}"] * 5
            vault.fake.keys["jwt"].rotate()
            await signer.refresh()
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_token_file_is_reread_on_change_and_after_a_403(tmp_path: Path, vault: RunningVault) -> None:
    token_file = tmp_path / "vault-token"
    vault.fake.add_token("first-token")
    token_file.write_text("first-token")
    signer = build_signer(tmp_path, vault, token=None, token_file=str(token_file))
    try:
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        vault.fake.tokens.pop("first-token")
        vault.fake.add_token("second-token")
        token_file.write_text("second-token")
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        vault.fake.tokens.pop("second-token")
        with pytest.raises(VaultMisconfigured):
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_kubernetes_login_renewal_and_relogin(tmp_path: Path, vault: RunningVault, clock: Clock) -> None:
    vault.fake.clock = clock
    vault.fake.login_ttl = 300
    vault.fake.kubernetes_roles["jwtlet"] = {("jwtlet", "jwtlet")}
    vault.fake.kubernetes_jwts["kubernetes-sa-jwt"] = ("jwtlet", "jwtlet")
    signer = build_signer(tmp_path, vault, clock, token=None, kubernetes_auth={"role": "jwtlet"})
    try:
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        assert vault.fake.requests["login"] == 1
        first = signer.auth.login_token
        clock.advance(201)  # two thirds of the lease: renew
        await _settle()
        assert vault.fake.requests["renew-self"] == 1
        clock.advance(250)  # past the original lease: the renewal kept it alive
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        assert signer.auth.login_token == first
        vault.fake.tokens[str(first)].renewable = False
        clock.advance(201)
        await _settle()
        assert vault.fake.requests["login"] == 2, "renewal refused: log in again"
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await stopped(signer)


async def _settle() -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(20):
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_sealed_vault_is_503_then_recovers_without_restart(tmp_path: Path, vault: RunningVault) -> None:
    signer = build_signer(tmp_path, vault)
    try:
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        for fault in ("sealed", "rate_limited"):
            setattr(vault.fake, fault, True)
            with pytest.raises(DependencyUnavailable):
                await signer.sign({"typ": "JWT"}, {"sub": "x"})
            with pytest.raises(DependencyUnavailable):
                await signer.check_ready()
            setattr(vault.fake, fault, False)
            await signer.check_ready()
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
        await vault.server.stop()
        await close_http_client(signer.client)
        with pytest.raises(DependencyUnavailable):
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_missing_key_without_create_key_is_a_misconfiguration(tmp_path: Path, vault: RunningVault) -> None:
    signer = build_signer(tmp_path, vault, create_key=False)
    try:
        with pytest.raises(VaultMisconfigured):
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await stopped(signer)



def test_option_problems() -> None:
    with pytest.raises(PluginConfigError) as raised:
        parse_options({"token": "t", "token_file": "/f", "key_type": "aes", "rsa_algorithm": "HS256",
                       "timeout_secs": 0, "publish_before_use_secs": -1, "colour": 1}, dev=False)
    assert sorted(raised.value.messages) == sorted([
        "colour: unknown key",
        "url: required for vault-transit (an https URL)",
        "token, token_file, kubernetes_auth: give exactly one",
        "key_type: must be one of ed25519, ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096",
        "rsa_algorithm: must be RS256 or PS256",
        "timeout_secs: must be a number of at least 0.1",
        "publish_before_use_secs: must be a number of at least 0",
    ])


@pytest_twisted.ensureDeferred
async def test_a_vault_slower_than_the_timeout_is_503_not_a_hang(tmp_path: Path, vault: RunningVault) -> None:
    from twisted.internet import reactor

    signer = build_signer(tmp_path, vault, timeout_secs=0.2)
    signer.clock = reactor
    try:
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        vault.fake.latency = 2.0  # without the timeout the signature would simply arrive late
        with pytest.raises(DependencyUnavailable):
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
        vault.fake.latency = 0.0
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_building_for_check_config_asks_vault_nothing(tmp_path: Path, vault: RunningVault) -> None:
    """``jwtlet check-config`` builds the signer only to check its options."""
    context = signer_context(tmp_path)
    context.check_only = True
    signer = vault_transit.build({"url": vault.url, "token": ROOT, "key_name": "jwt"}, context)
    assert not signer._refreshing.running
    await close_http_client(signer.client)
    assert sum(vault.fake.requests.values()) == 0 and vault.fake.keys == {}


@pytest.mark.parametrize("damage", [
    lambda data: data["keys"]["1"].pop("public_key"),
    lambda data: data["keys"]["1"].update(public_key="not base64!"),
    lambda data: data["keys"].update({"one": {}}),
    lambda data: data.update(min_encryption_version="soon"),
], ids=["no-public-key", "bad-public-key", "bad-version-number", "bad-min-encryption-version"])
@pytest_twisted.ensureDeferred
async def test_unreadable_key_metadata_is_a_misconfiguration_not_a_crash(
    tmp_path: Path, vault: RunningVault, damage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = TransitKey.read

    def damaged(key: TransitKey) -> dict[str, Any]:
        data = original(key)
        damage(data)
        return data

    monkeypatch.setattr(TransitKey, "read", damaged)
    vault.fake.create_key("jwt")
    signer = build_signer(tmp_path, vault)
    try:
        with pytest.raises(VaultMisconfigured):
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await stopped(signer)
