"""The deployment artefacts agree with the config defaults, the apps and each other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from jwtlet import config
from jwtlet.discovery import discover
from jwtlet.exchange import TokenExchangeAPI

ROOT = Path(__file__).resolve().parent.parent


def manifests() -> list[dict[str, Any]]:
    found = []
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        found.extend(document for document in yaml.safe_load_all(path.read_text()) if document)
    return found


def one(kind: str) -> dict[str, Any]:
    (found,) = [m for m in manifests() if m["kind"] == kind]
    return found


def test_the_configmap_holds_a_valid_config_with_the_documented_ports() -> None:
    raw = yaml.safe_load(one("ConfigMap")["data"]["jwtlet.yaml"])
    parsed = config.parse(raw, known_plugins=discover().known())
    defaults = config.Config.__attrs_attrs__  # type: ignore[attr-defined]
    assert parsed.token_exchange_port == defaults.token_exchange_port.default == 8080
    assert parsed.management_port == defaults.management_port.default == 8081


def test_the_deployment_matches_the_config_the_image_and_the_apps() -> None:
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"token": 8080, "management": 8081}
    served = {rule.rule for rule in TokenExchangeAPI.app.url_map.iter_rules()}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" in served
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready" in served
    config_path = container["args"][container["args"].index("--config") + 1]
    (mount,) = container["volumeMounts"]
    assert config_path == f"{mount['mountPath']}/jwtlet.yaml"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'"--config", "{config_path}"' in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, re.MULTILINE) and pod["securityContext"]["runAsUser"] == 10001
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    service_ports = {port["name"]: port["port"] for port in one("Service")["spec"]["ports"]}
    assert service_ports == ports


def test_rbac_grants_exactly_tokenreviews_and_tokenrequests() -> None:
    rules = one("ClusterRole")["rules"]
    granted = {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {("authentication.k8s.io", "tokenreviews", "create"), ("", "serviceaccounts/token", "create")}
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == one("ServiceAccount")["metadata"]["name"]
