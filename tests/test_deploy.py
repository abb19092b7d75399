"""
The deployment artefacts agree with the config defaults, the image and the apps, and keep the
defences of security.md ("Deployment artefacts"): TokenReview-only base RBAC, TokenRequest only
in the ext-authz overlay and only for named accounts, a management port policed apart, pods that
run unprivileged on a read-only root, a digest-pinned base image and Postgres over verify-full.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.testing import MemoryReactorClock

from jwtlet import config
from jwtlet.config import Config
from jwtlet.daemon.wiring import known_plugins, load_checked, make_service
from jwtlet.discovery import discover
from jwtlet.extauthz.grpc_server import grpc_address
from jwtlet.web.token_api import EXT_AUTHZ_PREFIX, TokenExchangeAPI

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAY = DEPLOY / "ext-authz"
ADMIN_LABEL = {"jwtlet-admin": "true"}

Manifest = dict[str, Any]


# -- reading the artefacts ------------------------------------------------------------


def documents(path: Path) -> list[Manifest]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def kustomization(directory: Path) -> Manifest:
    (found,) = documents(directory / "kustomization.yaml")
    return found


def own_manifests(directory: Path) -> list[Manifest]:
    """The objects a kustomization lists from its own directory (not the bases it includes)."""
    listed = [directory / entry for entry in kustomization(directory).get("resources", [])]
    return [document for path in listed if path.is_file() for document in documents(path)]


def base_manifests() -> list[Manifest]:
    return own_manifests(BASE)


def one(kind: str, manifests: list[Manifest]) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind]
    return found


def pod_specs(manifests: list[Manifest]) -> Iterator[Manifest]:
    for manifest in manifests:
        template = manifest.get("spec", {}).get("template")
        if template is not None:
            yield template["spec"]


def base_pod() -> Manifest:
    return one("Deployment", base_manifests())["spec"]["template"]["spec"]


def base_container() -> Manifest:
    (container,) = base_pod()["containers"]
    return container


def configmap_text() -> str:
    text: str = one("ConfigMap", base_manifests())["data"]["jwtlet.yaml"]
    return text


def overlay_environment() -> dict[str, str]:
    """
    What the overlay's Deployment patch puts in jwtlet's environment: each variable read from
    the generated ConfigMap, resolved to the generator's file as kustomize does.
    """
    generated = {
        generator["name"]: {Path(file).name: (OVERLAY / file).read_text() for file in generator["files"]}
        for generator in kustomization(OVERLAY)["configMapGenerator"]
    }
    environment = {}
    for patch in kustomization(OVERLAY)["patches"]:
        for pod in pod_specs(documents(OVERLAY / patch["path"])):
            for container in pod["containers"]:
                for variable in container.get("env", []):
                    reference = variable["valueFrom"]["configMapKeyRef"]
                    environment[variable["name"]] = generated[reference["name"]][reference["key"]]
    return environment


def load_deployed(tmp_path: Path, environment: Mapping[str, str]) -> Config:
    """The config exactly as the container loads it: the mounted file plus its environment."""
    path = tmp_path / "jwtlet.yaml"
    path.write_text(configmap_text())
    loaded, _ = load_checked(str(path), environment)
    return loaded


def rules(role: Manifest) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


# -- NetworkPolicy, evaluated --------------------------------------------------------


def _port_matches(entry: Manifest, port: int, container: Manifest) -> bool:
    wanted = entry["port"]
    if isinstance(wanted, str):
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        wanted = names[wanted]
    return bool(wanted == port and entry.get("protocol", "TCP") == "TCP")


def _labels_match(selector: Manifest, labels: Mapping[str, str]) -> bool:
    assert "matchExpressions" not in selector, "this evaluator reads matchLabels only"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _peer_admits(peer: Manifest, namespace: str, namespace_labels: Mapping[str, str], home: str) -> bool:
    if "ipBlock" in peer:
        return True  # an address range can cover any pod: treat it as open
    if "namespaceSelector" in peer:
        return _labels_match(peer["namespaceSelector"], namespace_labels)
    return namespace == home  # a bare podSelector means pods of the policy's own namespace


def admitted(policy: Manifest, port: int, namespace: str, namespace_labels: Mapping[str, str]) -> bool:
    """Whether ``policy`` lets a pod of ``namespace`` reach jwtlet's ``port`` (no pod labels used)."""
    container = base_container()
    home = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(_port_matches(entry, port, container) for entry in ports):
            continue
        peers = rule.get("from")
        if peers is None or any(_peer_admits(peer, namespace, namespace_labels, home) for peer in peers):
            return True
    return False


def namespace_labels(name: str, **labels: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **labels}


# -- every file ------------------------------------------------------------------------


def generated_files(directory: Path) -> set[Path]:
    """Files a kustomization turns into ConfigMap data: config, not manifests."""
    generators = kustomization(directory).get("configMapGenerator", [])
    return {directory / file for generator in generators for file in generator["files"]}


def test_every_manifest_parses_and_every_kustomization_names_files_that_exist() -> None:
    generated = generated_files(BASE) | generated_files(OVERLAY)
    paths = [path for path in sorted(DEPLOY.rglob("*.yaml")) if path not in generated]
    assert paths
    for path in paths:
        for document in documents(path):
            assert document.get("apiVersion") and document.get("kind"), path
    for directory in (BASE, OVERLAY):
        listed = kustomization(directory)
        named = [directory / entry for entry in listed.get("resources", [])]
        named += [directory / patch["path"] for patch in listed.get("patches", [])]
        for path in [*named, *generated_files(directory)]:
            assert path.exists(), path
    assert "../base" in kustomization(OVERLAY)["resources"]


def test_the_configmap_holds_a_valid_config_with_the_documented_ports() -> None:
    raw = yaml.safe_load(configmap_text())
    parsed = config.parse(raw, known_plugins=known_plugins(discover()))
    defaults = config.Config.__attrs_attrs__  # type: ignore[attr-defined]
    assert parsed.token_exchange_port == defaults.token_exchange_port.default == 8080
    assert parsed.management_port == defaults.management_port.default == 8081


@pytest.mark.parametrize("with_ext_authz", [False, True], ids=["base", "ext-authz"])
def test_the_deployed_config_builds_the_whole_daemon(tmp_path: Path, with_ext_authz: bool) -> None:
    """Plugin options are checked when the daemon is built: every plugin must accept the shipped ones."""
    environment = overlay_environment() if with_ext_authz else {}
    loaded = load_deployed(tmp_path, environment)
    assert (loaded.ext_authz is not None) == with_ext_authz
    make_service(loaded, discover(), MemoryReactorClock())


def test_the_deployment_matches_the_config_the_image_and_the_apps() -> None:
    manifests = base_manifests()
    pod, container = base_pod(), base_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"token": 8080, "management": 8081}
    served = {rule.rule for rule in TokenExchangeAPI.app.url_map.iter_rules()}
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"]["path"] == path in served
        assert ports[container[probe]["httpGet"]["port"]] == 8080, "probes ask the token port"
    config_path = container["args"][container["args"].index("--config") + 1]
    (mount,) = container["volumeMounts"]
    assert config_path == f"{mount['mountPath']}/jwtlet.yaml"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    projected = {item["path"]: source["configMap"]["name"]
                 for source in volume["projected"]["sources"] for item in source["configMap"]["items"]}
    assert projected["jwtlet.yaml"] == one("ConfigMap", manifests)["metadata"]["name"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'"--config", "{config_path}"' in dockerfile
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user is not None
    assert (int(user[1]), int(user[2])) == (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    assert pod["serviceAccountName"] == one("ServiceAccount", manifests)["metadata"]["name"]


def test_the_postgres_ca_named_in_the_storage_url_is_mounted() -> None:
    url = yaml.safe_load(configmap_text())["storage_backend"]["url"]
    root_cert = Path(str(conninfo_to_dict(url)["sslrootcert"]))
    (mount,) = base_container()["volumeMounts"]
    (volume,) = [v for v in base_pod()["volumes"] if v["name"] == mount["name"]]
    projected = {item["path"] for source in volume["projected"]["sources"] for item in source["configMap"]["items"]}
    assert root_cert.parent == Path(mount["mountPath"]) and root_cert.name in projected


# -- RBAC ------------------------------------------------------------------------------


def test_a_compromised_pod_of_the_base_install_can_review_tokens_but_mint_none() -> None:
    """
    An attacker who runs code in a jwtlet pod acts with its service account. In the base install
    that account may create TokenReviews and nothing else: no TokenRequest for any account.
    """
    manifests = base_manifests()
    roles = [m for m in manifests if m["kind"] in ("ClusterRole", "Role")]
    assert [role["kind"] for role in roles] == ["ClusterRole"]
    assert rules(roles[0]) == {("authentication.k8s.io", "tokenreviews", "create")}
    every_role = [m for path in BASE.glob("*.yaml") for m in documents(path) if m["kind"] in ("ClusterRole", "Role")]
    assert every_role == roles, "no role hides in a base file the kustomization does not list"
    binding = one("ClusterRoleBinding", manifests)
    assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == one("ServiceAccount", manifests)["metadata"]["name"]


def test_the_ext_authz_overlay_grants_tokenrequest_only_per_namespace_for_named_accounts() -> None:
    """
    TokenRequest lets its holder become any account it covers, so the overlay grants it through
    namespaced Roles whose rules name the target accounts, never through a ClusterRole.
    """
    manifests = own_manifests(OVERLAY)
    assert not [m for m in manifests if m["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [m for m in manifests if m["kind"] == "Role"]
    assert roles
    service_account = one("ServiceAccount", base_manifests())["metadata"]
    for role in roles:
        namespace = role["metadata"]["namespace"]
        assert rules(role) == {("", "serviceaccounts/token", "create")}
        assert all(rule["resourceNames"] for rule in role["rules"]), "every rule names its accounts"
        (binding,) = [m for m in manifests if m["kind"] == "RoleBinding"
                      and m["roleRef"]["name"] == role["metadata"]["name"] and m["metadata"]["namespace"] == namespace]
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", **service_account}]


def test_the_overlay_turns_ext_authz_on_with_grpc_on_loopback(tmp_path: Path) -> None:
    """
    The sidecar model: only an Envoy in the same pod reaches the gRPC check; and the OIDC
    validator is given the audience security.md requires of it.
    """
    loaded = load_deployed(tmp_path, overlay_environment())
    assert loaded.ext_authz is not None and loaded.ext_authz.grpc_endpoint is not None
    host, _ = grpc_address(loaded.ext_authz.grpc_endpoint).rsplit(":", 1)
    assert ipaddress.ip_address(host).is_loopback
    if loaded.ext_authz.validator.type == "kubernetes-oidc":
        assert loaded.ext_authz.audience


# -- network -----------------------------------------------------------------------------


def test_the_management_port_has_a_service_of_its_own() -> None:
    ports = {port["name"]: port["containerPort"] for port in base_container()["ports"]}
    services = {service["metadata"]["name"]: service for service in base_manifests() if service["kind"] == "Service"}
    exposed = {name: {ports[port["targetPort"]] for port in service["spec"]["ports"]}
               for name, service in services.items()}
    assert exposed == {"jwtlet": {8080}, "jwtlet-management": {8081}}
    template_labels = one("Deployment", base_manifests())["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= template_labels.items()
        for port in service["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]]


def test_a_pod_outside_the_admin_namespace_cannot_reach_the_management_port() -> None:
    """
    An attacker with a pod in an ordinary namespace (or jwtlet's own) tries the management port:
    the NetworkPolicy drops it. Only namespaces labelled as admin get through; the token port
    stays open to the whole cluster.
    """
    policy = one("NetworkPolicy", base_manifests())
    template_labels = one("Deployment", base_manifests())["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= template_labels.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    for name, labels in (("default", {}), ("jwtlet", {}), ("platform", {"jwtlet-admin": "false"})):
        assert not admitted(policy, 8081, name, namespace_labels(name, **labels)), name
        assert admitted(policy, 8080, name, namespace_labels(name, **labels)), name
    assert admitted(policy, 8081, "platform", namespace_labels("platform", **ADMIN_LABEL))
    assert not admitted(policy, 9001, "default", namespace_labels("default"))


def test_the_admin_namespace_label_is_documented() -> None:
    (key, value), = ADMIN_LABEL.items()
    assert f"{key}={value}" in (ROOT / "docs" / "operating.md").read_text()


# -- pod security and image ---------------------------------------------------------


def test_every_container_runs_unprivileged_on_a_read_only_root() -> None:
    """
    A process that breaks out of jwtlet's code finds no root user, no capabilities, no way to
    gain privileges, the runtime's seccomp filter, and a root filesystem it cannot change.
    """
    pods = list(pod_specs(base_manifests()))
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        writable = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume
            if volume["name"] in writable:
                assert "emptyDir" in volume, volume
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert not context.get("privileged")


def test_the_overlay_patch_adds_environment_only_so_the_base_pod_security_holds() -> None:
    for patch in kustomization(OVERLAY)["patches"]:
        for pod in pod_specs(documents(OVERLAY / patch["path"])):
            assert set(pod) == {"containers"}
            assert all(set(container) == {"name", "env"} for container in pod["containers"])


def test_the_base_image_is_pinned_by_digest() -> None:
    """A tag can be re-pointed at other content upstream; a digest cannot."""
    sources = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert sources
    for source in sources:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", source), source


def postgres_urls() -> Iterator[tuple[Path, str]]:
    pattern = re.compile(r"postgres(?:ql)?://[^\s`\"')]+")
    for path in sorted([*DEPLOY.rglob("*.yaml"), *(ROOT / "docs").rglob("*.md")]):
        for url in pattern.findall(path.read_text()):
            yield path, url


def test_every_postgres_example_verifies_the_server() -> None:
    """Copied as-is, an example URL must not let a machine in the middle read or change mappings."""
    found = list(postgres_urls())
    assert any(path.is_relative_to(DEPLOY) for path, _ in found)
    for path, url in found:
        assert conninfo_to_dict(url).get("sslmode") == "verify-full", (path, url)


# -- kustomize itself ------------------------------------------------------------------


def kustomize(directory: Path) -> list[Manifest]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations are checked file by file only")
    rendered = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,  # noqa: S603
                              timeout=120, check=True)
    return [document for document in yaml.safe_load_all(rendered.stdout) if document]


def test_kustomize_renders_the_base_and_the_overlay_as_the_files_say() -> None:
    base, overlay = kustomize(BASE), kustomize(OVERLAY)
    assert not any("serviceaccounts/token" in yaml.safe_dump(m) for m in base)
    assert [m for m in base if m not in overlay] == [m for m in base if m["kind"] == "Deployment"]
    (deployment,) = [m for m in overlay if m["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    generated = {m["metadata"]["name"]: m["data"] for m in overlay if m["kind"] == "ConfigMap"}
    added = [variable for variable in container["env"] if "configMapKeyRef" in variable["valueFrom"]]
    environment = {variable["name"]: generated[variable["valueFrom"]["configMapKeyRef"]["name"]][
        variable["valueFrom"]["configMapKeyRef"]["key"]] for variable in added}
    assert environment == overlay_environment()
    container["env"] = [variable for variable in container["env"] if variable not in added]
    assert [deployment] == [m for m in base if m["kind"] == "Deployment"], "the overlay changes nothing else"


# -- Istio ---------------------------------------------------------------------------------

ISTIO = OVERLAY / "istio"


def istio_provider() -> Manifest:
    (operator,) = documents(ISTIO / "mesh-config.yaml")
    assert operator["kind"] == "IstioOperator"
    (provider,) = operator["spec"]["meshConfig"]["extensionProviders"]
    return dict(provider)


def test_the_istio_provider_reaches_the_http_front_of_the_overlay(tmp_path: Path) -> None:
    """
    The provider names the `jwtlet` Service's token port and the path the HTTP front is mounted on,
    sends the workload's token and takes the swapped one back, and never fails open.
    """
    provider = istio_provider()["envoyExtAuthzHttp"]
    service = next(m for m in base_manifests() if m["kind"] == "Service" and m["metadata"]["name"] == "jwtlet")
    assert provider["service"] == f"jwtlet.{service['metadata']['namespace']}.svc.cluster.local"
    assert provider["port"] in {port["port"] for port in service["spec"]["ports"]}
    assert provider["pathPrefix"] + "/" == EXT_AUTHZ_PREFIX
    assert provider["failOpen"] is False
    assert "authorization" in provider["headersToUpstreamOnAllow"]
    loaded = load_deployed(tmp_path, overlay_environment())
    assert loaded.ext_authz is not None and loaded.ext_authz.http
    assert {"authorization", loaded.ext_authz.resource_header} <= set(provider["includeRequestHeadersInCheck"])


def test_the_authorization_policy_hands_checks_to_the_jwtlet_provider() -> None:
    (policy,) = documents(ISTIO / "authorization-policy.yaml")
    assert policy["kind"] == "AuthorizationPolicy"
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == istio_provider()["name"]
    assert policy["spec"]["rules"], "a CUSTOM policy without rules checks nothing"


def test_the_gateway_namespace_reaches_the_token_port_and_no_service_exposes_grpc() -> None:
    """
    The sidecar model: gRPC binds loopback, so no Service port 9001 exists; remote gateways use
    HTTP mode on the token port, which the NetworkPolicy admits from their namespace.
    """
    (policy,) = documents(ISTIO / "authorization-policy.yaml")
    network = one("NetworkPolicy", base_manifests())
    gateway_namespace = policy["metadata"]["namespace"]
    assert admitted(network, istio_provider()["envoyExtAuthzHttp"]["port"], gateway_namespace,
                    namespace_labels(gateway_namespace))
    services = [m for m in own_manifests(BASE) + own_manifests(OVERLAY) if m["kind"] == "Service"]
    assert all(port["port"] != 9001 for service in services for port in service["spec"]["ports"])
