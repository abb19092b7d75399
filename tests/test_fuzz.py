"""
Random and adversarial input against both apps (in memory) and the config
loader, a bounded number of examples each: never a 5xx, every error a JSON
object without a traceback, a token or a secret; the loader either accepts
or lists problems, and never raises anything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from apps import Apps, Reply, call, make_apps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jwtlet import config
from jwtlet.config import ConfigError
from jwtlet.model import ResourceMapping, ScopeMapping

URL = "http://jwtlet.test"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SECRETS = ("token-workload", "token-admin", "Traceback", "File \"", "sqlite3", "psycopg")

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)
form_names = st.sampled_from(["grant_type", "subject_token", "subject_token_type", "resource", "scope", "audience",
                              "requested_token_type", "actor_token", "actor_token_type", "client_id"]) | text


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Apps:
    apps = make_apps(tmp_path_factory.mktemp("fuzz"), {"api_keys": {"profiles": {"p": {"audience": "a"}}}})
    store = apps.store()
    store.add_scope(ScopeMapping("read", {"role": "reader"}))
    store.add_mapping(ResourceMapping("system:serviceaccount:ns:workload", "ctx", scopes=("read",)))
    return apps


def assert_safe(reply: Reply) -> None:
    assert reply.code < 500, (reply.code, reply.body)
    body = reply.body.decode("utf-8", "replace")
    assert not any(secret in body for secret in SECRETS), body
    if reply.code >= 400 and reply.code != 405 or reply.header("Content-Type") == "application/json":
        document = json.loads(reply.body) if reply.body else None
        if reply.code >= 400:
            assert isinstance(document, dict) and isinstance(document.get("error"), str), body


@FUZZ
@given(
    fields=st.lists(st.tuples(form_names, text | st.sampled_from(["token-workload", "ctx", "read"])), max_size=8),
    content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json", "text/plain", None,
                                  "application/x-www-form-urlencoded; charset=utf-8"]),
    raw=st.none() | st.binary(max_size=200),
)
def test_token_endpoint(apps: Apps, fields: list[tuple[str, str]], content_type: Any, raw: Any) -> None:
    body = raw if raw is not None else "&".join(f"{quote(k)}={quote(v)}" for k, v in fields).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    assert_safe(call(apps.token, "POST", f"{URL}/token", data=body, headers=headers))


@FUZZ
@given(body=json_values, raw=st.none() | st.binary(max_size=200), profile=st.sampled_from(["p", "q"]) | text)
def test_api_key_endpoint(apps: Apps, body: Any, raw: Any, profile: str) -> None:
    data = raw if raw is not None else json.dumps(body).encode()
    reply = call(apps.token, "POST", f"{URL}/v0/token/{quote(profile, safe='')}", data=data)
    assert_safe(reply)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    collection=st.sampled_from(["mappings", "scopes", "integrations", "nowhere", ""]),
    segments=st.lists(text, max_size=3),
    body=json_values,
    auth=st.sampled_from(["Bearer token-admin", "Bearer token-reader", "bearer token-admin", "Basic x", "", "Bearer"]),
    content_type=st.sampled_from(["application/json", "text/plain", None]),
)
def test_management_routes(apps: Apps, method: str, collection: str, segments: list[str], body: Any, auth: str,
                           content_type: Any) -> None:
    path = "/".join(["/api/v1", collection, *(quote(s, safe="") for s in segments)]).rstrip("/")
    headers = {"Authorization": auth} if auth else {}
    if content_type:
        headers["Content-Type"] = content_type
    reply = call(apps.management, method, URL + path, headers=headers,
                 data=None if method in ("GET", "HEAD") else json.dumps(body).encode())
    if method != "HEAD":
        assert_safe(reply)


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(
    st.sampled_from(["issuer", "bind", "token_exchange_port", "management_port", "token", "k8s", "signer",
                     "validator", "storage_backend", "rate_limits", "api_keys", "ext_authz", "logging", "metrics",
                     "service_accounts", "plugin_dirs", "vault", "management"]) | text,
    json_values, max_size=8))
def test_the_config_loader_accepts_or_lists_problems(raw: dict[str, Any]) -> None:
    try:
        config.parse(raw, data_dir=Path("/nonexistent"))
    except ConfigError as error:
        assert error.problems and all(isinstance(problem, str) and ": " in problem for problem in error.problems)
