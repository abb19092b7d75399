"""
The daemon as users run it (``twistd -n jwtlet`` in a subprocess) against the
fake Kubernetes API server over loopback, with each built-in Kubernetes
validator; an Authlib OAuth client performs the exchange and PyJWT verifies
the result from the published JWKS alone.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, AsyncIterator

import jwt as pyjwt
import pytest
import pytest_twisted
import treq
import yaml
from authlib.integrations.requests_client import OAuth2Session
from daemon_fixtures import post_json
from k8s_fixtures import Cluster, start_cluster, stopping
from twisted.internet.threads import deferToThread

from jwtlet.policy import GRANT_TYPE_TOKEN_EXCHANGE as GRANT
from jwtlet.testing.process import DaemonProcess

pytestmark = pytest.mark.slow

CLIENT_AUDIENCE = "jwtlet.example.com"
MANAGEMENT_AUDIENCE = "jwtlet-management"


@pytest_twisted.async_yield_fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in stopping(await start_cluster()):
        running.fake.add_service_account("edc", "connector")
        running.fake.add_service_account("platform", "admin")
        yield running


def write_config(tmp_path: Path, cluster: Cluster, validator: str) -> Path:
    own = tmp_path / "own-token"
    own.write_text("jwtlet-own-token")
    validators: dict[str, Any] = {
        "kubernetes-tokenreview": {"type": "kubernetes-tokenreview"},
        "kubernetes-oidc": {"type": "kubernetes-oidc", "issuers": [
            {"issuer": cluster.fake.issuer, "bearer_token_file": str(own)}]},
    }
    config = {
        "issuer": "http://127.0.0.1:8080",
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "jwtlet.sqlite3")},
        "k8s": {"api_server_url": cluster.url, "token_file": str(own), "cluster_issuer": cluster.fake.issuer},
        "validator": validators[validator],
        "token": {"client_audience": CLIENT_AUDIENCE, "audience": "dataspace"},
        "management": {"client_audience": MANAGEMENT_AUDIENCE},
        "signer": {"type": "local-key", "key_file": str(tmp_path / "signing.jwk"), "generate": True},
        "service_accounts": {"system:serviceaccount:platform:admin": ["management:write"]},
    }
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("validator", ["kubernetes-tokenreview", "kubernetes-oidc"])
@pytest_twisted.ensureDeferred
async def test_authlib_exchange_verified_from_the_jwks(tmp_path: Path, cluster: Cluster, validator: str) -> None:
    daemon = DaemonProcess.start(["--config", str(write_config(tmp_path, cluster, validator))], cwd=tmp_path)
    try:
        await deferToThread(daemon.wait_listening)
        admin = cluster.fake.mint("platform", "admin", [MANAGEMENT_AUDIENCE])
        api = f"{daemon.management_url}/api/v1"
        assert await post_json(f"{api}/scopes", {"scope": "read", "claims": {"role": "reader"}}, admin) == 201
        mapping = {"clientIdentifier": "system:serviceaccount:edc:connector", "participantContext": "provider-1",
                   "scopes": ["read"], "audiences": ["dataspace"]}
        assert await post_json(f"{api}/mappings", mapping, admin) == 201

        subject = cluster.fake.mint("edc", "connector", [CLIENT_AUDIENCE])
        session = OAuth2Session(client_id="edc-connector", token_endpoint_auth_method="none")

        def fetch() -> Any:
            return session.fetch_token(
                f"{daemon.token_url}/token", grant_type=GRANT, subject_token=subject,
                subject_token_type="urn:ietf:params:oauth:token-type:jwt", resource="provider-1", scope="read",
            )

        issued = await deferToThread(fetch)
        assert issued["token_type"] == "Bearer" and issued["scope"] == "read"
        response = await treq.get(f"{daemon.token_url}/.well-known/jwks.json")
        jwks = json.loads(await response.content())
        token = issued["access_token"]
        (key,) = [k for k in jwks["keys"] if k["kid"] == pyjwt.get_unverified_header(token)["kid"]]
        claims = pyjwt.decode(token, pyjwt.PyJWK.from_dict(key), algorithms=[key["alg"]], audience="dataspace")
        assert claims["sub"] == "provider-1" and claims["role"] == "reader"
        assert claims["act"]["sub"] == "system:serviceaccount:edc:connector"
        assert claims["act"]["k8s_uid"] == cluster.fake.accounts[("edc", "connector")]

        wrong_audience = cluster.fake.mint("edc", "connector", ["somebody-else"])
        response = await treq.post(f"{daemon.token_url}/token", data={
            "grant_type": GRANT, "subject_token": wrong_audience, "resource": "provider-1"})
        assert (response.code, json.loads(await response.content())["error"]) == (400, "invalid_grant")

        if validator == "kubernetes-tokenreview":
            cluster.fake.failure_status = 503
            response = await treq.post(f"{daemon.token_url}/token", data={
                "grant_type": GRANT, "subject_token": cluster.fake.mint("edc", "connector", [CLIENT_AUDIENCE]),
                "resource": "provider-1"})
            body = json.loads(await response.content())
            assert (response.code, body["error"]) == (503, "temporarily_unavailable")
            assert response.headers.getRawHeaders("retry-after") == ["5"]
            cluster.fake.failure_status = None
        assert subject not in daemon.output() and token not in daemon.output()
    finally:
        code = await deferToThread(daemon.stop, signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)
