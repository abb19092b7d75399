"""The fake Vault checked with hvac, Vault's own Python client, over loopback."""

from __future__ import annotations

import base64
import re
from typing import Any, AsyncIterator

import hvac
import hvac.exceptions
import pytest_twisted
from twisted.internet.task import Clock
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


@pytest_twisted.ensureDeferred
async def test_each_version_carries_its_creation_time_as_vault_writes_it(vault: RunningVault) -> None:
    """Go's RFC3339Nano: UTC ``Z``, up to nine fraction digits, trailing zeros dropped."""
    clock = Clock()
    clock.advance(1714557600.5)
    vault.fake.clock = clock
    vault.fake.create_key("jwt")
    clock.advance(0.25)
    vault.fake.keys["jwt"].rotate()
    clock.advance(59.25)
    vault.fake.keys["jwt"].rotate()
    vault.fake.clock = None  # wall-clock time from here on, with its nanoseconds
    vault.fake.keys["jwt"].rotate()

    def read() -> dict[str, Any]:
        return dict(client(vault).secrets.transit.read_key("jwt")["data"]["keys"])

    keys = await deferToThread(read)
    created = [keys[str(version)]["creation_time"] for version in range(1, 5)]
    assert created[:3] == ["2024-05-01T10:00:00.5Z", "2024-05-01T10:00:00.75Z", "2024-05-01T10:01:00Z"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?Z", created[3]), created[3]


@pytest_twisted.ensureDeferred
async def test_hvac_batch_sign_is_200_with_every_items_own_result_in_order(vault: RunningVault) -> None:
    """As OpenBao answers (tests/test_openbao.py compares the two): failed items do not fail the request."""
    def scenario() -> tuple[Any, Any, list[type[Exception]]]:
        transit = client(vault).secrets.transit
        transit.create_key("jwt", key_type="ed25519")
        mixed = transit.sign_data("jwt", key_version=1, marshaling_algorithm="jws", batch_input=[
            {"input": "aGk=", "reference": "a"}, {"input": "!!"}, {"context": "eA=="}, {"input": None}])
        too_new = transit.sign_data("jwt", key_version=2, batch_input=[{"input": "aGk="}])
        raised = []
        for batch in ([], "aGk=", [{"input": True}]):
            try:
                transit.sign_data("jwt", batch_input=batch)
            except Exception as error:
                raised.append(type(error))
        return mixed, too_new, raised

    mixed, too_new, raised = await deferToThread(scenario)
    signed, undecodable, missing, null = mixed["data"]["batch_results"]
    assert signed["signature"].startswith("vault:v1:") and "=" not in signed["signature"]
    assert (signed["key_version"], signed["reference"]) == (1, "a")
    assert undecodable["error"].startswith("unable to decode input as base64: ")
    assert {k: v for k, v in undecodable.items() if k != "error"} == {"key_version": 0, "reference": ""}
    assert missing == {"key_version": 0, "error": "missing input", "reference": ""}
    assert null["key_version"] == 1, "null is an empty input, which signs"
    assert too_new["data"]["batch_results"] == [
        {"key_version": 0, "error": "requested version for signing is higher than the latest key version",
         "reference": ""}]
    assert raised == [hvac.exceptions.InvalidRequest, hvac.exceptions.InternalServerError,
                      hvac.exceptions.InternalServerError]
