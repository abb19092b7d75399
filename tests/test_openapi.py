"""
The OpenAPI documents describe the apps as they run: every route served is
documented, every documented path is served, and answers validate against
the documented schemas.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from apps import Apps, call, make_apps
from openapi_spec_validator import validate

from jwtlet import policy
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.web.management_api import ManagementAPI
from jwtlet.web.token_api import TokenExchangeAPI

OPENAPI = Path(__file__).resolve().parent.parent / "openapi"
URL = "http://jwtlet.test"

# Routes whose handlers split a catch-all path into the documented segments.
SPLIT_ROUTES = {
    "/api/v1/mappings/{_rest}": {"/api/v1/mappings/{client}", "/api/v1/mappings/{client}/{context}"},
    "/api/v1/scopes/{_rest}": {"/api/v1/scopes/{scope}"},
    "/api/v1/integrations/{_rest}": {"/api/v1/integrations/{id}/keys", "/api/v1/integrations/{id}/keys/{keyId}"},
    "/ext_authz/": {"/ext_authz/{path}"},
    "/ext_authz/{__rest__}": {"/ext_authz/{path}"},
}


def document(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((OPENAPI / name).read_text())
    return loaded


def served_paths(app: Any) -> set[str]:
    paths = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule)
        paths |= SPLIT_ROUTES.get(path, {path})
    return paths


@pytest.mark.parametrize("name, app", [("token-exchange.yaml", TokenExchangeAPI.app),
                                       ("management.yaml", ManagementAPI.app)])
def test_documents_are_valid_and_match_the_routes(name: str, app: Any) -> None:
    spec = document(name)
    validate(spec)
    assert set(spec["paths"]) == served_paths(app)


def schema_of(spec: dict[str, Any], path: str, method: str, status: int) -> Any:
    response = spec["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    media = response["content"]
    return next(iter(media.values()))["schema"]


def check(spec: dict[str, Any], path: str, method: str, status: int, body: bytes) -> None:
    schema = schema_of(spec, path, method, status)
    resolver_spec = {"components": spec["components"], **schema}
    jsonschema.validate(json.loads(body), resolver_spec)


@pytest.fixture
def apps(tmp_path: Path) -> Apps:
    apps = make_apps(tmp_path)
    store = apps.store()
    store.add_scope(ScopeMapping("read", {"role": "reader"}))
    store.add_mapping(ResourceMapping("system:serviceaccount:ns:workload", "ctx", scopes=("read",)))
    return apps


def test_token_port_answers_match_the_document(apps: Apps) -> None:
    spec = document("token-exchange.yaml")
    form = {"grant_type": policy.GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": "token-workload",
            "resource": "ctx", "scope": "read"}
    issued = call(apps.token, "POST", f"{URL}/token", data=form)
    assert issued.code == 200
    check(spec, "/token", "post", 200, issued.body)
    for bad, status in (({**form, "subject_token": "x"}, 400), ({**form, "resource": "nope"}, 403)):
        refused = call(apps.token, "POST", f"{URL}/token", data=bad)
        assert refused.code == status
        check(spec, "/token", "post", status, refused.body)
    check(spec, "/.well-known/jwks.json", "get", 200, call(apps.token, "GET", f"{URL}/.well-known/jwks.json").body)
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration", "/ready"):
        check(spec, path, "get", 200, call(apps.token, "GET", URL + path).body)


def test_management_answers_match_the_document(apps: Apps) -> None:
    spec = document("management.yaml")
    admin = {"Authorization": "Bearer token-admin", "Content-Type": "application/json"}
    check(spec, "/api/v1/mappings", "get", 200, call(apps.management, "GET", f"{URL}/api/v1/mappings",
                                                     headers=admin).body)
    created = call(apps.management, "POST", f"{URL}/api/v1/mappings", headers=admin,
                   data=json.dumps({"clientIdentifier": "c", "participantContext": "p", "scopes": []}).encode())
    check(spec, "/api/v1/mappings", "post", 201, created.body)
    conflict = call(apps.management, "POST", f"{URL}/api/v1/mappings", headers=admin,
                    data=json.dumps({"clientIdentifier": "c", "participantContext": "p", "scopes": []}).encode())
    check(spec, "/api/v1/mappings", "post", 409, conflict.body)
    check(spec, "/api/v1/mappings/{client}/{context}", "get", 200,
          call(apps.management, "GET", f"{URL}/api/v1/mappings/c/p", headers=admin).body)
    check(spec, "/api/v1/scopes", "get", 200, call(apps.management, "GET", f"{URL}/api/v1/scopes",
                                                   headers=admin).body)
    call(apps.management, "POST", f"{URL}/api/v1/integrations", headers=admin,
         data=json.dumps({"integrationId": "acme"}).encode())
    key = call(apps.management, "POST", f"{URL}/api/v1/integrations/acme/keys", headers=admin,
               data=json.dumps({"tier": 1}).encode())
    check(spec, "/api/v1/integrations/{id}/keys", "post", 201, key.body)
    check(spec, "/api/v1/integrations", "get", 200, call(apps.management, "GET", f"{URL}/api/v1/integrations",
                                                         headers=admin).body)
    unauthorized = call(apps.management, "GET", f"{URL}/api/v1/mappings")
    check(spec, "/api/v1/mappings", "get", 401, unauthorized.body)
