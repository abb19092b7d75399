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
from twisted.internet.task import Clock
from vault_fixtures import RunningVault, build_signer, running_vault

from jwtlet.interfaces import DependencyUnavailable, PluginConfigError
from jwtlet.plugins.vault_transit import VaultMisconfigured, parse_options
from jwtlet.testing.signer_conformance import assert_signer_conforms


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


@pytest_twisted.ensureDeferred
async def test_rotation_publishes_first_signs_later_and_keeps_old_versions(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    signer = build_signer(tmp_path, vault, clock, token_ttl=600, publish_before_use_secs=30, key_refresh_secs=10)
    signer.startService()
    try:
        await signer.refresh()

        async def issue_and_verify() -> str:
            token = await signer.sign({"typ": "JWT"}, {"sub": "x"})
            published = {k["kid"]: k for k in (await signer.public_jwks())["keys"]}
            kid = pyjwt.get_unverified_header(token)["kid"]
            pyjwt.decode(token, pyjwt.PyJWK.from_dict(published[kid]), algorithms=["EdDSA"])
            return str(kid)

        assert await issue_and_verify() == "jwt-1"
        vault.fake.keys["jwt"].rotate()
        await signer.refresh()
        kids = [k["kid"] for k in (await signer.public_jwks())["keys"]]
        assert kids == ["jwt-2", "jwt-1"], "the new version is published at once"
        assert await issue_and_verify() == "jwt-1", "but signs only after publish_before_use_secs"
        clock.advance(31)
        assert await issue_and_verify() == "jwt-2"
        clock.advance(600)
        assert [k["kid"] for k in (await signer.public_jwks())["keys"]] == ["jwt-2", "jwt-1"]
        clock.advance(31)
        assert [k["kid"] for k in (await signer.public_jwks())["keys"]] == ["jwt-2"], \
            "dropped once every token it signed has expired"
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_rotation_under_traffic_never_yields_an_unverifiable_token(tmp_path: Path, vault: RunningVault) -> None:
    signer = build_signer(tmp_path, vault, key_type="ecdsa-p256")
    try:
        for round_ in range(4):
            for _ in range(5):
                token = await signer.sign({"typ": "JWT"}, {"round": round_})
                published = {k["kid"]: k for k in (await signer.public_jwks())["keys"]}
                kid = pyjwt.get_unverified_header(token)["kid"]
                pyjwt.decode(token, pyjwt.PyJWK.from_dict(published[kid]), algorithms=["ES256"])
            vault.fake.keys["jwt"].rotate()
            await signer.refresh()
        assert kid == "jwt-4"
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
        await signer.client._jwtlet_pool.closeCachedConnections()
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
                       "timeout_secs": 0, "colour": 1})
    assert sorted(raised.value.messages) == sorted([
        "colour: unknown key",
        "url: required for vault-transit (an http(s) URL)",
        "token, token_file, kubernetes_auth: give exactly one",
        "key_type: must be one of ed25519, ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096",
        "rsa_algorithm: must be RS256 or PS256",
        "timeout_secs: must be a number of at least 0.1",
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
