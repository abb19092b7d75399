"""
Coming from M-Lab's token-exchange (migration.md): integrations bound to
profiles, as M-Lab kept each kind of credential in a namespace of its own
(an integration key never mints an ``autojoin`` token); per-profile ``iss``
and static claims (``org``); keys of M-Lab's own shape
(``mlabk.cii_….ki_….<secret>``); ``jwtlet apikey create --profile`` and a
``--tier`` refused as the API refuses it; the stores keep the profiles, and
integrations stored before keep every profile with one warning at start.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import types
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import pytest_twisted
import yaml
from apps import Apps, Reply, call, make_apps
from postgres_fixtures import postgres_server, postgres_url, start_store  # noqa: F401 - fixtures
from twisted.internet import reactor
from twisted.logger import LogLevel, globalLogPublisher

from jwtlet.apikeys import keys as apikeys
from jwtlet.config import ConfigError, parse
from jwtlet.exchange.apikeys import UnboundIntegrations
from jwtlet.model import ApiKeyRecord, Integration
from jwtlet.plugins import sql_store
from jwtlet.plugins.sqlite_store import sqlite
from jwtlet.testing.process import bin_path

URL = "http://jwtlet.test"
ADMIN = {"Authorization": "Bearer token-admin", "Content-Type": "application/json"}
#: M-Lab's two namespaces, with its claims: ``iss: token-exchange``, ``org`` on autojoin tokens, 20 s integrations.
MLAB = {"api_keys": {"prefix": "mlabk", "profiles": {
    "integration": {"audience": "integration", "ttl_secs": 20, "issuer": "token-exchange"},
    "autojoin": {"audience": "autojoin", "issuer": "token-exchange", "claims": {"org": "mlab"}},
}}}


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    return make_apps(tmp_path, MLAB)


def settled(deferred: Any) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results[0]


def management(apps: Apps, method: str, path: str, body: Any = None) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    return call(apps.management, method, f"{URL}/api/v1{path}", data=data, headers=ADMIN)


def v0(apps: Apps, profile: str, key: str) -> Reply:
    return call(apps.token, "POST", f"{URL}/v0/token/{profile}", data=json.dumps({"api_key": key}).encode(),
                headers={"Content-Type": "application/json"})


def rfc8693(apps: Apps, profile: str, key: str) -> Reply:
    form = f"grant_type=urn:ietf:params:oauth:grant-type:token-exchange&subject_token={key}" \
           f"&subject_token_type=urn:jwtlet:params:oauth:token-type:api-key&resource={profile}"
    return call(apps.token, "POST", f"{URL}/token", data=form.encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"})


def key_for(apps: Apps, integration: str, profiles: list[str], key_id: str = "ki_0123456789abcdef") -> str:
    assert management(apps, "POST", "/integrations", {"integrationId": integration, "profiles": profiles}).code == 201
    created = management(apps, "POST", f"/integrations/{integration}/keys", {"tier": 2, "keyId": key_id})
    assert created.code == 201, created.body
    return str(created.json()["apiKey"])


def claims_of(apps: Apps, token: str, audience: str) -> dict[str, Any]:
    (key,) = call(apps.token, "GET", f"{URL}/.well-known/jwks.json").json()["keys"]
    return dict(pyjwt.decode(token, pyjwt.PyJWK.from_dict(key), algorithms=["EdDSA"], audience=audience,
                             options={"verify_exp": False, "verify_iat": False, "verify_nbf": False}))


# -- bound integrations ---------------------------------------------------------------


def test_an_integration_key_never_mints_an_autojoin_token(apps: Apps) -> None:
    """
    The attacker holds a key of an integration bound to ``integration`` and asks
    for an ``autojoin`` token, on both routes: the answer is exactly a bad key's.
    """
    key = key_for(apps, "cii_acme", ["integration"])
    assert v0(apps, "integration", key).code == 200
    refused, bad = v0(apps, "autojoin", key), v0(apps, "autojoin", key[:-2] + "xx")
    assert (refused.code, refused.json()) == (bad.code, bad.json()) == (401, {"error": "invalid API key"})
    assert (rfc8693(apps, "autojoin", key).json()["error"] == rfc8693(apps, "autojoin", key[:-2] + "xx")
            .json()["error"] == "invalid_grant")


def test_with_several_profiles_an_integration_must_name_its_own(apps: Apps) -> None:
    missing = management(apps, "POST", "/integrations", {"integrationId": "cii_acme"})
    assert missing.code == 400 and missing.json()["error"].startswith("profiles is required")
    unknown = management(apps, "POST", "/integrations", {"integrationId": "cii_acme", "profiles": ["admin"]})
    assert unknown.code == 400 and unknown.json()["error"].startswith("no such profile: admin")
    for malformed in ([], "integration", [1]):
        assert management(apps, "POST", "/integrations",
                          {"integrationId": "cii_acme", "profiles": malformed}).code == 400
    both = management(apps, "POST", "/integrations",
                      {"integrationId": "cii_acme", "profiles": ["integration", "autojoin"]})
    assert both.code == 201 and both.json()["profiles"] == ["autojoin", "integration"]
    assert management(apps, "GET", "/integrations").json()[0]["profiles"] == ["autojoin", "integration"]


def test_with_one_profile_an_integration_is_bound_to_it(tmp_path: Path) -> None:
    """So that a profile added to the config later is not open to the keys made before it."""
    apps = make_apps(tmp_path, {"api_keys": {"profiles": {"integration": {"audience": "integration"}}}})
    assert management(apps, "POST", "/integrations", {"integrationId": "acme"}).json()["profiles"] == ["integration"]


def test_integrations_stored_before_keep_every_profile_and_one_warning_names_them(apps: Apps) -> None:
    store = apps.store()
    for integration in ("cii_old", "cii_older"):
        settled(store.add_integration(Integration(integration)))  # as stored before profiles existed
    made = apikeys.make_key("mlabk", "cii_old", "ki_1", lambda n: bytes(n))
    settled(store.add_api_key(ApiKeyRecord("cii_old", made.key_id, made.secret_sha256)))
    key_for(apps, "cii_new", ["integration"])
    assert v0(apps, "integration", made.text).code == v0(apps, "autojoin", made.text).code == 200
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        UnboundIntegrations(store, apps.token_api.exchange.api_keys.profiles).startService()  # type: ignore[union-attr]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [event for event in seen if event.get("jwtlet_event") == "apikey.unbound_integrations"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == LogLevel.warn
    assert warnings[0]["integrations"] == ["cii_old", "cii_older"]


# -- per-profile iss and claims ---------------------------------------------------------


def test_each_profile_signs_with_its_own_iss_and_static_claims(apps: Apps) -> None:
    key = key_for(apps, "cii_acme", ["integration", "autojoin"])
    integration = claims_of(apps, v0(apps, "integration", key).json()["token"], "integration")
    assert integration["iss"] == "token-exchange" and integration["exp"] - integration["iat"] == 20
    assert (integration["int_id"], integration["key_id"], integration["tier"]) == ("cii_acme", "ki_0123456789abcdef", 2)
    assert "org" not in integration
    autojoin = claims_of(apps, v0(apps, "autojoin", key).json()["token"], "autojoin")
    assert (autojoin["iss"], autojoin["org"], autojoin["exp"] - autojoin["iat"]) == ("token-exchange", "mlab", 3600)


def test_a_profile_without_issuer_uses_the_top_level_one(tmp_path: Path) -> None:
    apps = make_apps(tmp_path, {"api_keys": {"profiles": {"p": {"audience": "x"}}}})
    assert management(apps, "POST", "/integrations", {"integrationId": "acme"}).code == 201
    key = management(apps, "POST", "/integrations/acme/keys", {}).json()["apiKey"]
    assert claims_of(apps, v0(apps, "p", key).json()["token"], "x")["iss"] == "https://jwtlet.test"


@pytest.mark.parametrize("claim", ["iss", "exp", "jti", "tier", "int_id", "key_id"])
def test_a_profiles_static_claims_never_take_a_reserved_name(claim: str) -> None:
    raw = {"issuer": "https://jwtlet.example", "token": {"client_audience": "a", "audience": "b"},
           "signer": {"type": "local-key"},
           "api_keys": {"profiles": {"p": {"audience": "x", "claims": {"org": "mlab", claim: 1}}}}}
    with pytest.raises(ConfigError) as raised:
        parse(raw)
    assert raised.value.problems == [f"api_keys.profiles.p.claims: {claim}: reserved claim names"]


# -- M-Lab's key shape -----------------------------------------------------------------


def test_keys_of_mlabs_own_shape_are_made_and_accepted(apps: Apps) -> None:
    key = key_for(apps, "cii_acme", ["integration"])
    prefix, integration, key_id, secret = key.split(".")
    assert (prefix, integration, key_id, len(secret)) == ("mlabk", "cii_acme", "ki_0123456789abcdef", 43)
    assert apikeys.parse_key(key, "mlabk") is not None
    assert v0(apps, "integration", key).code == 200


# -- the stores keep the profiles -----------------------------------------------------


def sqlite_store(path: Path) -> Any:
    store = sqlite.build({"path": str(path)}, types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir="."))
    store.startService()
    return store


@pytest_twisted.ensureDeferred
async def test_sqlite_keeps_the_profiles_and_a_database_of_the_previous_schema_keeps_its_integrations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "jwtlet.sqlite3"
    profiles_version = next(index for index, script in enumerate(sql_store.SCHEMA)
                            if "integrations ADD COLUMN profiles" in script)
    monkeypatch.setattr(sql_store, "SCHEMA", sql_store.SCHEMA[:profiles_version])  # the schema before profiles
    old = sqlite_store(path)
    await old.check_ready()  # migrated to that schema
    old_connection = sqlite3.connect(path)
    old_connection.execute("INSERT INTO integrations VALUES ('cii_old', 'made before', 0)")
    old_connection.execute("INSERT INTO api_keys VALUES ('cii_old', 'ki_1', ?, 0, '', 'active', 0)",
                           (apikeys.digest("s"),))
    old_connection.commit()
    old_connection.close()
    await old.stopService()
    monkeypatch.undo()
    store = sqlite_store(path)
    try:
        await store.add_integration(Integration("cii_new", profiles=("integration",)))
        await store.add_api_key(ApiKeyRecord("cii_new", "ki_2", apikeys.digest("t")))
        listed = {found.integration_id: found.profiles for found in await store.list_integrations()}
        assert listed == {"cii_old": None, "cii_new": ("integration",)}
        assert (await store.get_api_key("cii_old", "ki_1")).profiles is None
        assert (await store.get_api_key("cii_new", "ki_2")).profiles == ("integration",)
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_postgres_keeps_the_profiles(postgres_url: str) -> None:  # noqa: F811 - the fixture
    store = start_store(postgres_url)
    try:
        await store.add_integration(Integration("cii_old"))
        await store.add_integration(Integration("cii_new", profiles=("autojoin", "integration")))
        await store.add_api_key(ApiKeyRecord("cii_new", "ki_2", apikeys.digest("t")))
        listed = {found.integration_id: found.profiles for found in await store.list_integrations()}
        assert listed == {"cii_old": None, "cii_new": ("autojoin", "integration")}
        assert (await store.get_api_key("cii_new", "ki_2")).profiles == ("autojoin", "integration")
    finally:
        await store.stopService()


# -- jwtlet apikey ------------------------------------------------------------------------


def run(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [bin_path("jwtlet"), "apikey", *arguments], capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )


def test_apikey_create_binds_profiles_and_refuses_a_negative_tier(tmp_path: Path) -> None:
    config = tmp_path / "jwtlet.yaml"
    config.write_text(yaml.safe_dump({
        "issuer": "https://jwtlet.example.com",
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "keys.sqlite3")},
        "validator": {"type": "kubernetes-oidc", "issuers": [{"issuer": "https://k8s.example"}]},
        "token": {"client_audience": "a", "audience": "b"},
        "signer": {"type": "local-key"},
        **MLAB,
    }))
    negative = run(tmp_path, "create", "--config", str(config), "--integration", "cii_acme", "--tier", "-1",
                   "--profile", "integration")
    assert negative.returncode == 2 and "--tier: must be an integer from 0 to" in negative.stderr
    unbound = run(tmp_path, "create", "--config", str(config), "--integration", "cii_acme")
    assert unbound.returncode == 2 and "profiles is required" in unbound.stderr
    created = run(tmp_path, "create", "--config", str(config), "--integration", "cii_acme", "--key-id", "ki_1",
                  "--profile", "integration", "--profile", "autojoin")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("mlabk.cii_acme.ki_1.")
    other = run(tmp_path, "create", "--config", str(config), "--integration", "cii_acme", "--profile", "integration")
    assert other.returncode == 1 and "bound to other profiles" in other.stderr
    connection = sqlite3.connect(tmp_path / "keys.sqlite3")
    (profiles,) = connection.execute("SELECT profiles FROM integrations WHERE integration_id = 'cii_acme'").fetchone()
    assert json.loads(profiles) == ["autojoin", "integration"]
