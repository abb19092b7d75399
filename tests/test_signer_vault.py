"""
The vault-transit signer against the fake Vault over loopback: every key type
through the signer conformance suite, the PSS salt-length trap, rotation,
token files, Kubernetes login and renewal, outages and recovery, and signs
batched into one transit request.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, AsyncIterator

import jwt as pyjwt
import pytest
import pytest_twisted
from jwcrypto.common import base64url_decode
from jwcrypto.jwk import JWK
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from vault_fixtures import KEY_TYPES, ROOT, RunningVault, build_signer, running_vault, signer_context

from jwtlet.interfaces import DependencyUnavailable, PluginConfigError
from jwtlet.outbound import close_http_client
from jwtlet.plugins.vault_transit import (
    KeyVersion,
    VaultMisconfigured,
    batch_outcomes,
    parse_creation_time,
    parse_options,
    signing_version,
    vault_transit,
)
from jwtlet.testing.conformance.signer import assert_signer_conforms
from jwtlet.testing.vault import TransitKey


@pytest_twisted.async_yield_fixture
async def vault() -> AsyncIterator[RunningVault]:
    async for running in running_vault():
        yield running


async def stopped(signer: Any) -> None:
    await signer.stopService()


@pytest.mark.parametrize("key_type, rsa_algorithm, alg", KEY_TYPES)
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


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest_twisted.ensureDeferred
async def test_a_claim_that_is_not_json_fails_before_vault_is_asked(tmp_path: Path, vault: RunningVault,
                                                                     value: float) -> None:
    """NaN and Infinity are not JSON: a verifier would refuse the token, so Vault never signs it."""
    signer = build_signer(tmp_path, vault)
    try:
        await signer.sign({"typ": "JWT"}, {"sub": "s"})
        signed = vault.fake.last_sign_request
        with pytest.raises(ValueError):
            await signer.sign({"typ": "JWT"}, {"sub": "s", "bad": value})
        assert vault.fake.last_sign_request is signed, "no sign request went out"
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


@pytest.mark.parametrize("key", ["publish_before_use_secs", "key_refresh_secs", "timeout_secs", "batch_window_ms"])
def test_an_option_that_is_not_a_finite_number_is_a_problem(key: str) -> None:
    """A NaN publish delay would keep every new version from ever signing."""
    with pytest.raises(PluginConfigError, match=key):
        parse_options({"url": "https://vault:8200", "token": "t", key: math.nan}, dev=False)


@pytest_twisted.ensureDeferred
async def test_an_odd_key_answer_does_not_stop_the_refreshes(
    tmp_path: Path, vault: RunningVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One answer whose data is not an object must not end the refresh loop: later rotations are still seen."""
    vault.fake.create_key("jwt")
    original = TransitKey.read
    monkeypatch.setattr(TransitKey, "read", lambda key: ["not", "an", "object"])
    signer = build_signer(tmp_path, vault)
    try:
        # What the LoopingCall runs: a refresh that raised would stop it.
        await signer._refresh_quietly()
        assert signer.versions == {}
        monkeypatch.setattr(TransitKey, "read", original)
        await signer._refresh_quietly()
        assert set(signer.versions) == {1}
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_twenty_first_signs_share_one_key_read(tmp_path: Path, vault: RunningVault) -> None:
    """A burst at start-up (or after a restart of Vault) must not become a burst of key reads."""
    vault.fake.create_key("jwt")
    signer = build_signer(tmp_path, vault)
    try:
        tokens = await gatherResults([signer.sign({"typ": "JWT"}, {"sub": f"s{index}"}) for index in range(20)])
        assert len(tokens) == 20
        assert vault.fake.requests["keys"] == 1
    finally:
        await stopped(signer)


def test_a_typo_or_a_wrong_type_in_kubernetes_auth_is_a_problem() -> None:
    """config.md: a typo must not silently fall back to a default (here: the service-account token file)."""
    base = {"url": "https://vault:8200"}
    with pytest.raises(PluginConfigError) as raised:
        parse_options(dict(base, kubernetes_auth={"role": "r", "jwt_fiel": "/x", "mount": ["a"]}), dev=False)
    assert sorted(raised.value.messages) == ["kubernetes_auth.jwt_fiel: unknown key",
                                             "kubernetes_auth.mount: must be a non-empty string"]


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
        await vault.fake.requested("renew-self", 1).addTimeout(10, reactor)
        clock.advance(250)  # past the original lease: the renewal kept it alive
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        assert signer.auth.login_token == first
        vault.fake.tokens[str(first)].renewable = False
        clock.advance(201)
        await vault.fake.requested("login", 2).addTimeout(10, reactor)  # renewal refused: log in again
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await stopped(signer)


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


# -- batching ---------------------------------------------------------------------------------


def subject_of(signing_input: bytes) -> str:
    """The ``sub`` claim of a JWS signing input as the fake Vault receives it."""
    payload = signing_input.split(b".")[1].decode()
    return str(json.loads(base64url_decode(payload))["sub"])


async def signed_and_verified(signer: Any, pending: list[Any]) -> list[dict[str, Any]]:
    """Await ``pending`` signs; each token's claims and ``kid``, verified against the signer's JWKS."""
    tokens = await gatherResults(pending, consumeErrors=True)
    published = {k["kid"]: k for k in (await signer.public_jwks())["keys"]}
    verified = []
    for token in tokens:
        kid = pyjwt.get_unverified_header(token)["kid"]
        claims = pyjwt.decode(token, pyjwt.PyJWK.from_dict(published[kid]), algorithms=[signer.algorithm])
        verified.append(dict(claims, kid=kid))
    return verified


async def batching_signer(tmp_path: Path, vault: RunningVault, clock: Clock, **options: Any) -> Any:
    """A signer on ``clock`` that already knows its key, so that signs go straight to the batch."""
    signer = build_signer(tmp_path, vault, clock, **dict({"batch_window_ms": 2, "key_type": "ecdsa-p256"}, **options))
    await signer.refresh()
    return signer


@pytest_twisted.ensureDeferred
async def test_signs_waiting_together_go_to_vault_as_one_batch_request(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    signer = await batching_signer(tmp_path, vault, clock)
    try:
        pending = [signer.sign({"typ": "JWT"}, {"sub": f"s{n}"}) for n in range(5)]
        assert vault.fake.sign_batches == [], "nothing is sent before the window has passed"
        clock.advance(0.002)
        claims = await signed_and_verified(signer, pending)
        assert [c["sub"] for c in claims] == [f"s{n}" for n in range(5)], "each token carries its own claims"
        assert vault.fake.sign_batches == [5] and vault.fake.requests["sign"] == 1
        sent = vault.fake.last_sign_request
        assert sent["key_version"] == 1, "the version is explicit, once for the whole batch"
        assert [item["reference"] for item in sent["batch_input"]] == ["0", "1", "2", "3", "4"]
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_full_batch_goes_at_once_and_the_rest_waits_for_the_window(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    signer = await batching_signer(tmp_path, vault, clock, batch_max=2)
    try:
        pending = [signer.sign({"typ": "JWT"}, {"sub": f"s{n}"}) for n in range(5)]
        await signed_and_verified(signer, pending[:4])
        assert vault.fake.sign_batches == [2, 2] and not pending[4].called
        clock.advance(0.002)
        await signed_and_verified(signer, pending[4:])
        assert vault.fake.sign_batches == [2, 2, 1]
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_window_of_zero_sends_every_sign_alone(tmp_path: Path, vault: RunningVault, clock: Clock) -> None:
    signer = await batching_signer(tmp_path, vault, clock, batch_window_ms=0)
    try:
        await signed_and_verified(signer, [signer.sign({"typ": "JWT"}, {"sub": f"s{n}"}) for n in range(3)])
        assert vault.fake.sign_batches == [1, 1, 1]
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_an_item_vault_refuses_fails_only_its_own_exchange(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    vault.fake.refuse_item = lambda data: "failed to sign" if subject_of(data) == "victim" else None
    signer = await batching_signer(tmp_path, vault, clock)
    try:
        pending = [signer.sign({"typ": "JWT"}, {"sub": sub}) for sub in ("a", "victim", "b")]
        clock.advance(0.002)
        with pytest.raises(VaultMisconfigured, match="failed to sign"):
            await pending[1]
        assert [c["sub"] for c in await signed_and_verified(signer, [pending[0], pending[2]])] == ["a", "b"]
        assert vault.fake.sign_batches == [3]
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_vault_or_proxy_reordering_batch_results_hands_no_exchange_another_ones_signature(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    """
    The results come back reversed: by position alone the first exchange would
    get the third one's signature (a token that never verifies).  The echoed
    references expose it: the moved items fail, the one left in place is right.
    """
    vault.fake.reverse_batch_results = True
    signer = await batching_signer(tmp_path, vault, clock)
    try:
        pending = [signer.sign({"typ": "JWT"}, {"sub": f"s{n}"}) for n in range(3)]
        clock.advance(0.002)
        for moved in (pending[0], pending[2]):
            with pytest.raises(VaultMisconfigured, match="out of order"):
                await moved
        assert [c["sub"] for c in await signed_and_verified(signer, [pending[1]])] == ["s1"]
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_an_outage_fails_every_waiting_sign_as_unavailable(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    signer = await batching_signer(tmp_path, vault, clock)
    try:
        vault.fake.sealed = True
        pending = [signer.sign({"typ": "JWT"}, {"sub": f"s{n}"}) for n in range(4)]
        clock.advance(0.002)
        for sign in pending:
            with pytest.raises(DependencyUnavailable):
                await sign
        assert vault.fake.requests["sign"] == 1
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_a_new_signing_version_closes_the_waiting_batch_so_each_batch_has_one_version(
    tmp_path: Path, vault: RunningVault, clock: Clock
) -> None:
    vault.fake.clock = clock
    signer = await batching_signer(tmp_path, vault, clock, publish_before_use_secs=0)
    try:
        before = signer.sign({"typ": "JWT"}, {"sub": "before"})
        vault.fake.keys["jwt"].rotate()
        await signer.refresh()
        after = signer.sign({"typ": "JWT"}, {"sub": "after"})
        (first,) = await signed_and_verified(signer, [before])  # sent when the version changed, not after the window
        assert vault.fake.sign_batches == [1] and vault.fake.last_sign_request["key_version"] == 1
        clock.advance(0.002)
        (second,) = await signed_and_verified(signer, [after])
        assert vault.fake.sign_batches == [1, 1] and vault.fake.last_sign_request["key_version"] == 2
        assert (first["sub"], first["kid"], second["sub"], second["kid"]) == ("before", "jwt-1", "after", "jwt-2")
    finally:
        await stopped(signer)


@pytest_twisted.ensureDeferred
async def test_stopping_sends_the_signs_still_waiting(tmp_path: Path, vault: RunningVault, clock: Clock) -> None:
    signer = await batching_signer(tmp_path, vault, clock, batch_window_ms=500)
    waiting = signer.sign({"typ": "JWT"}, {"sub": "late"})
    await stopped(signer)
    assert (await signed_and_verified(signer, [waiting]))[0]["sub"] == "late"


def test_batch_outcomes_are_matched_by_position_and_reference() -> None:
    good = {"signature": "vault:v3:c2ln", "key_version": 3, "reference": "0"}
    assert batch_outcomes(3, 1, {"batch_results": [good]}) == ["c2ln"]
    legacy = {"signature": "vault:v3:c2ln", "key_version": 3}
    assert batch_outcomes(3, 1, {"batch_results": [legacy]}) == ["c2ln"], "Vaults that echo no reference"
    unmatched: list[Any] = [{}, {"batch_results": []}, {"batch_results": [good, good]}, {"batch_results": "x"}, None]
    for data in unmatched:
        with pytest.raises(VaultMisconfigured, match="does not match"):
            batch_outcomes(3, 1, data)
    wrong = [dict(good, reference="1"), dict(good, signature="vault:v2:c2ln"), dict(good, signature=""),
             {"key_version": 0, "error": "missing input", "reference": "0"}, "junk"]
    for result in wrong:
        (outcome,) = batch_outcomes(3, 1, {"batch_results": [result]})
        assert isinstance(outcome, VaultMisconfigured), result


def test_batch_options() -> None:
    base = {"url": "https://vault:8200", "token": "t"}
    defaults = parse_options(base, dev=False)
    assert (defaults.batch_max, defaults.batch_window) == (32, 0.002)
    chosen = parse_options(dict(base, batch_max=200, batch_window_ms=0), dev=False)
    assert (chosen.batch_max, chosen.batch_window) == (200, 0.0)
    with pytest.raises(PluginConfigError) as raised:
        parse_options(dict(base, batch_max=0, batch_window_ms=-1), dev=False)
    assert sorted(raised.value.messages) == ["batch_max: must be an integer from 1 to 200",
                                             "batch_window_ms: must be a number from 0 to 1000"]
    for wrong in ({"batch_max": 2.5}, {"batch_max": 201}, {"batch_max": True}, {"batch_window_ms": 1001},
                  {"batch_window_ms": "2"}):
        with pytest.raises(PluginConfigError):
            parse_options(dict(base, **wrong), dev=False)
