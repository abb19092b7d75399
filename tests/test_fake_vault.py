"""The fake Vault checked with hvac, Vault's own Python client, over loopback."""

from __future__ import annotations

import base64
from typing import Any, AsyncIterator

import hvac
import hvac.exceptions
import pytest_twisted
from twisted.internet.threads import deferToThread
from vault_fixtures import ROOT, RunningVault, running_vault


@pytest_twisted.async_yield_fixture
async def vault() -> AsyncIterator[RunningVault]:
    async for running in running_vault():
        yield running


def client(vault: RunningVault, token: str = ROOT) -> hvac.Client:
    return hvac.Client(url=vault.url, token=token)


@pytest_twisted.ensureDeferred
async def test_hvac_creates_reads_signs_and_verifies(vault: RunningVault) -> None:
    def scenario() -> dict[str, Any]:
        transit = client(vault).secrets.transit
        transit.create_key("jwt", key_type="ecdsa-p256")
        read = transit.read_key("jwt")
        data = base64.b64encode(b"header.payload").decode()
        asn1 = transit.sign_data("jwt", hash_input=data)["data"]["signature"]
        jws = transit.sign_data("jwt", hash_input=data, marshaling_algorithm="jws")["data"]["signature"]
        verified = transit.verify_signed_data("jwt", hash_input=data, signature=asn1)["data"]["valid"]
        transit.rotate_key("jwt")
        return {"read": read, "asn1": asn1, "jws": jws, "verified": verified,
                "latest": transit.read_key("jwt")["data"]["latest_version"]}

    result = await deferToThread(scenario)
    data = result["read"]["data"]
    assert data["type"] == "ecdsa-p256" and data["latest_version"] == 1
    assert data["keys"]["1"]["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert data["keys"]["1"]["name"] == "P-256"
    assert result["asn1"].startswith("vault:v1:") and result["jws"].startswith("vault:v1:")
    asn1 = result["asn1"].split(":")[2]
    assert asn1.startswith("MEU") or asn1.startswith("MEY") or asn1.startswith("MEQ"), "DER in standard base64"
    assert len(result["jws"].split(":")[2]) == 86 and "=" not in result["jws"], "raw r||s, base64url"
    assert result["verified"] is True and result["latest"] == 2


@pytest_twisted.ensureDeferred
async def test_hvac_sees_vaults_errors(vault: RunningVault) -> None:
    def scenario() -> list[type[Exception]]:
        raised = []
        transit = client(vault).secrets.transit
        for action in (lambda: transit.read_key("missing"),
                       lambda: transit.sign_data("missing", hash_input="aGk="),
                       lambda: client(vault, "bad-token").secrets.transit.read_key("x")):
            try:
                action()
            except Exception as error:
                raised.append(type(error))
        vault.fake.sealed = True
        try:
            transit.read_key("x")
        except Exception as error:
            raised.append(type(error))
        return raised

    assert await deferToThread(scenario) == [
        hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden,
        hvac.exceptions.VaultDown,
    ]


@pytest_twisted.ensureDeferred
async def test_kubernetes_login_and_renewal_with_hvac(vault: RunningVault) -> None:
    vault.fake.kubernetes_roles["jwtlet"] = {("jwtlet", "jwtlet")}
    vault.fake.kubernetes_jwts["sa-jwt"] = ("jwtlet", "jwtlet")

    def scenario() -> tuple[Any, Any]:
        anonymous = hvac.Client(url=vault.url)
        login = anonymous.auth.kubernetes.login(role="jwtlet", jwt="sa-jwt")
        token = login["auth"]["client_token"]
        renewed = hvac.Client(url=vault.url, token=token).auth.token.renew_self()
        return login, renewed

    login, renewed = await deferToThread(scenario)
    assert login["auth"]["renewable"] is True and login["auth"]["lease_duration"] == 3600
    assert renewed["auth"]["client_token"] == login["auth"]["client_token"]


