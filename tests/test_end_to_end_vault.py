"""
The daemon (``twistd -n jwtlet``) signing with the fake Vault over loopback:
tokens verify from the JWKS, a sealed Vault is 503 and the daemon recovers by
itself, rotation at Vault reaches the JWKS and signs publish_before_use_secs
later.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator

import jwt as pyjwt
import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from vault_fixtures import ROOT, RunningVault, running_vault

from jwtlet.config.schema import dev_defaults
from jwtlet.daemon import dev as devissuer
from jwtlet.testing.process import DaemonProcess

pytestmark = pytest.mark.slow
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"


@pytest_twisted.async_yield_fixture
async def vault() -> AsyncIterator[RunningVault]:
    async for running in running_vault():
        yield running


def write_config(tmp_path: Path, vault: RunningVault, key_type: str, rsa_algorithm: str) -> Path:
    devissuer.ensure(tmp_path)
    config = {
        "issuer": "http://127.0.0.1:8080",
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "jwtlet.sqlite3")},
        "validator": dev_defaults(tmp_path)["validator"],
        "token": {"client_audience": "jwtlet-dev", "audience": "svc", "token_ttl_secs": 300},
        "vault": {"url": vault.url, "token": ROOT, "key_name": "jwtlet", "key_type": key_type,
                  "rsa_algorithm": rsa_algorithm, "key_refresh_secs": 1, "publish_before_use_secs": 3,
                  "timeout_secs": 2},
        "service_accounts": {"system:serviceaccount:ops:admin": ["management:write"]},
    }
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def exchange(daemon: DaemonProcess, tmp_path: Path) -> Any:
    subject = devissuer.mint(tmp_path, "apps", "web", int(time.time()))
    response = await treq.post(f"{daemon.token_url}/token", data={
        "grant_type": GRANT, "subject_token": subject, "resource": "web-ctx"})
    return response.code, response.headers, json.loads(await response.content())


async def verify(daemon: DaemonProcess, token: str) -> dict[str, Any]:
    response = await treq.get(f"{daemon.token_url}/.well-known/jwks.json")
    published = {k["kid"]: k for k in json.loads(await response.content())["keys"]}
    header = pyjwt.get_unverified_header(token)
    key = published[header["kid"]]
    return dict(pyjwt.decode(token, pyjwt.PyJWK.from_dict(key), algorithms=[key["alg"]], audience="svc"))


@pytest.mark.parametrize("key_type, rsa_algorithm", [("ed25519", "RS256"), ("rsa-2048", "PS256")])
@pytest_twisted.ensureDeferred
async def test_vault_signed_exchange_outage_and_rotation(
    tmp_path: Path, vault: RunningVault, key_type: str, rsa_algorithm: str
) -> None:
    daemon = DaemonProcess.start(["--config", str(write_config(tmp_path, vault, key_type, rsa_algorithm))],
                                 cwd=tmp_path)
    try:
        await deferToThread(daemon.wait_listening)
        admin = devissuer.mint(tmp_path, "ops", "admin", int(time.time()))
        response = await treq.post(
            f"{daemon.management_url}/api/v1/mappings", headers={"Authorization": f"Bearer {admin}"},
            json={"clientIdentifier": "system:serviceaccount:apps:web", "participantContext": "web-ctx",
                  "scopes": []})
        assert response.code == 201, await response.content()
        code, _, body = await exchange(daemon, tmp_path)
        assert code == 200, body
        assert (await verify(daemon, body["access_token"]))["sub"] == "web-ctx"
        assert pyjwt.get_unverified_header(body["access_token"])["kid"] == "jwtlet-1"

        vault.fake.sealed = True
        code, headers, body = await exchange(daemon, tmp_path)
        assert (code, body["error"]) == (503, "temporarily_unavailable")
        assert headers.getRawHeaders("retry-after") == ["5"]
        ready = await treq.get(f"{daemon.management_url}/ready")
        assert ready.code == 503
        assert json.loads(await ready.content())["checks"]["signer"].startswith("unavailable")
        vault.fake.sealed = False
        code, _, body = await exchange(daemon, tmp_path)
        assert code == 200, "recovered without a restart"

        vault.fake.keys["jwtlet"].rotate()
        code, _, body = await exchange(daemon, tmp_path)
        assert pyjwt.get_unverified_header(body["access_token"])["kid"] == "jwtlet-1", "published before use"
        for _ in range(200):
            await deferLater(reactor, 0.05, lambda: None)  # signs from 3 s after its creation
            code, _, body = await exchange(daemon, tmp_path)
            assert code == 200
            await verify(daemon, body["access_token"])  # every token verifies against the JWKS of that moment
            if pyjwt.get_unverified_header(body["access_token"])["kid"] == "jwtlet-2":
                break
        else:
            raise AssertionError("the rotated version never signed")
        assert "Traceback" not in daemon.output()
    finally:
        code = await deferToThread(daemon.stop, signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)
