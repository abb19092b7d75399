"""
A CI job's token exchanged end to end: the daemon as users run it (``twistd
-n jwtlet`` in a subprocess) with the ``jwt-authenticator`` validator, a fake
GitHub Actions issuer on loopback (found through ``issuer.discoveryURL``, as
an issuer whose endpoints are served elsewhere would be), the mapping and
the roles keyed by the mapped username.
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
from daemon_fixtures import post_json
from test_jwt_authenticator import entry
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from jwtlet.policy import GRANT_TYPE_TOKEN_EXCHANGE as GRANT
from jwtlet.testing.loopback import serve
from jwtlet.testing.oidc import GITHUB_ISSUER, FakeOIDCIssuer
from jwtlet.testing.process import DaemonProcess

pytestmark = pytest.mark.slow

CLIENT_AUDIENCE = "https://jwtlet.example.com"
MANAGEMENT_AUDIENCE = "jwtlet-management"


@pytest_twisted.async_yield_fixture
async def github() -> AsyncIterator[FakeOIDCIssuer]:
    fake = FakeOIDCIssuer(issuer=GITHUB_ISSUER)
    server = await serve(reactor, fake.resource())
    fake.url = server.url
    try:
        yield fake
    finally:
        await server.stop()


def write_config(tmp_path: Path, github: FakeOIDCIssuer) -> Path:
    authenticator = entry(issuer={
        "url": GITHUB_ISSUER, "audiences": [CLIENT_AUDIENCE, MANAGEMENT_AUDIENCE], "audienceMatchPolicy": "MatchAny",
        "discoveryURL": f"{github.url}/.well-known/openid-configuration"})
    config = {
        "issuer": "http://127.0.0.1:8080",
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "jwtlet.sqlite3")},
        "validator": {"type": "jwt-authenticator", "jwt": [authenticator]},
        "token": {"client_audience": CLIENT_AUDIENCE, "audience": "deployments-api"},
        "management": {"client_audience": MANAGEMENT_AUDIENCE},
        "signer": {"type": "local-key", "key_file": str(tmp_path / "signing.jwk"), "generate": True},
        # The platform repository's jobs administer jwtlet: a role keyed by the mapped username.
        "service_accounts": {"github:acme/platform": ["management:write"]},
        # One exchange per caller per 100 s: the budget belongs to the mapped username, not to a token.
        "rate_limits": {"per_client_per_sec": 0.01},
    }
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def exchange(daemon: DaemonProcess, token: str) -> tuple[int, Any]:
    response = await treq.post(f"{daemon.token_url}/token", data={
        "grant_type": GRANT, "subject_token": token, "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "resource": "deployments", "scope": "deploy"})
    return int(response.code), json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_a_github_actions_job_exchanges_its_token_as_its_repository(
    tmp_path: Path, github: FakeOIDCIssuer
) -> None:
    daemon = DaemonProcess.start(["--config", str(write_config(tmp_path, github))], cwd=tmp_path)
    try:
        await deferToThread(daemon.wait_listening)
        api = f"{daemon.management_url}/api/v1"
        admin = github.sign(github.github_actions(MANAGEMENT_AUDIENCE, repository="acme/platform"))
        mapping = {"clientIdentifier": "github:acme/app", "participantContext": "deployments",
                   "scopes": ["deploy"], "audiences": ["deployments-api"],
                   "claimExpressions": {"git_ref": "subject.extra['github.com/ref'][0]"}}
        assert await post_json(f"{api}/scopes", {"scope": "deploy", "claims": {"role": "deployer"}}, admin) == 201
        assert await post_json(f"{api}/mappings", mapping, admin) == 201
        workload_as_admin = github.sign(github.github_actions(MANAGEMENT_AUDIENCE, repository="acme/app"))
        assert await post_json(f"{api}/mappings", dict(mapping, participantContext="other"),
                               workload_as_admin) == 403, "a repository without the role is no administrator"

        job = github.sign(github.github_actions(CLIENT_AUDIENCE, ref="refs/heads/release"))
        code, issued = await exchange(daemon, job)
        assert code == 200, issued
        response = await treq.get(f"{daemon.token_url}/.well-known/jwks.json")
        jwks = json.loads(await response.content())
        token = issued["access_token"]
        (key,) = [k for k in jwks["keys"] if k["kid"] == pyjwt.get_unverified_header(token)["kid"]]
        claims = pyjwt.decode(token, pyjwt.PyJWK.from_dict(key), algorithms=[key["alg"]], audience="deployments-api")
        assert claims["sub"] == "deployments" and claims["role"] == "deployer"
        assert claims["act"]["sub"] == "github:acme/app" and claims["act"]["iss"] == GITHUB_ISSUER
        assert claims["git_ref"] == "refs/heads/release", "a claim computed from subject.extra['github.com/ref']"

        # Another run of the same repository is the same caller: its budget is spent.
        code, body = await exchange(daemon, github.sign(github.github_actions(CLIENT_AUDIENCE)))
        assert code == 429, body
        # Another repository is another caller, with its own budget and no mapping.
        code, body = await exchange(daemon, github.sign(github.github_actions(CLIENT_AUDIENCE, repository="acme/web")))
        assert (code, body["error"]) == (403, "unauthorized_client")
        # An attacker's repository: a claim validation rule refuses it; the message is logged, not answered.
        code, body = await exchange(daemon, github.sign(github.github_actions(CLIENT_AUDIENCE,
                                                                              repository="mallory/app")))
        assert (code, body["error"]) == (400, "invalid_grant")
        assert "acme's" not in json.dumps(body)
        await deferToThread(daemon.wait_for, lambda _, line: "only acme's repositories" in line)
        assert job not in daemon.output() and token not in daemon.output()
    finally:
        code = await deferToThread(daemon.stop, signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)
