"""
``docs/migrating.md`` keeps its promises: one section per system jwtlet
replaces, each with its mapping table, what changes for relying parties, what
jwtlet refuses and why, and a before/after manifest that parses and says what
the section claims.
"""

from __future__ import annotations

import base64
import datetime
import re
import stat
import tomllib
import types
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jwtlet import mint
from jwtlet.config import read
from jwtlet.daemon.wiring import known_plugins
from jwtlet.discovery import discover
from jwtlet.extauthz.grpc_server import grpc_address
from jwtlet.plugins.postgres_store import postgres
from jwtlet.plugins.vault_transit import parse_options

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
SUBSECTIONS = (
    "Flags, environment and config keys",
    "What changes for relying parties",
    "What jwtlet refuses on purpose",
    "Before and after",
)
#: The sections of this guide.
SYSTEMS = ["The Rust jwtlet", "Mozambigue", "jwt-generator", "Tokensmith", "M-Lab token-exchange"]


def section(title: str) -> str:
    text = GUIDE.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section '## {title}'"
    return match.group(1)


def subsection(title: str, name: str) -> str:
    match = re.search(rf"^### {re.escape(name)}\n(.*?)(?=^### |\Z)", section(title), re.MULTILINE | re.DOTALL)
    assert match, f"{title}: no '### {name}'"
    return match.group(1)


@attrs.frozen
class Manifests:
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]

    def find(self, which: str, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in getattr(self, which) if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, (which, kind, name)
        return found[0]


def manifests(title: str) -> Manifests:
    """The two YAML blocks of "Before and after", the first introduced by "Before", the second by "After"."""
    text = subsection(title, "Before and after")
    blocks, start = [], 0
    for block in re.finditer(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        introduction = text[start:block.start()].strip().split("\n\n")[-1]
        blocks.append((introduction.split(" ", 1)[0], block.group(1)))
        start = block.end()
    assert [label for label, _ in blocks] == ["Before", "After"], title
    before, after = ([d for d in yaml.safe_load_all(body) if d] for _, body in blocks)
    return Manifests(before, after)


def container(deployment: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    found = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


def env_of(entry: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in entry.get("env", []) if "value" in item}


@pytest.mark.parametrize("title", SYSTEMS)
def test_each_system_has_its_section_with_every_part(title: str) -> None:
    for name in SUBSECTIONS:
        assert subsection(title, name).strip(), (title, name)
    table = subsection(title, "Flags, environment and config keys")
    assert len(re.findall(r"^\| .* \| .* \|$", table, re.MULTILINE)) >= 4, f"{title}: a mapping table"
    assert manifests(title).before and manifests(title).after


# -- the Rust jwtlet ----------------------------------------------------------------------------


def rust_configs() -> tuple[str, str]:
    found = manifests("The Rust jwtlet")
    return (found.find("before", "ConfigMap", "jwtlet-config")["data"]["config.toml"],
            found.find("after", "ConfigMap", "jwtlet-config")["data"]["config.toml"])


def test_the_rust_config_is_unchanged_but_for_issuer() -> None:
    before, after = rust_configs()
    added = [line for line in after.splitlines() if line not in before.splitlines()]
    assert added == ['issuer = "https://jwtlet.example.com"']
    assert [line for line in after.splitlines() if line not in added] == before.splitlines()


def test_the_rust_deployment_is_unchanged_but_for_the_image() -> None:
    found = manifests("The Rust jwtlet")
    before, after = (found.find(which, "Deployment", "jwtlet") for which in ("before", "after"))
    old, new = container(before, "jwtlet"), container(after, "jwtlet")
    assert old["image"] != new["image"]
    assert {**old, "image": new["image"]} == new
    assert new["command"] == ["jwtlet-server", "/etc/jwtlet/config.toml"]
    assert env_of(new)["RUST_LOG"] == "info,jwtlet=debug"


def test_the_rust_config_loads_as_written_keeping_its_vault_key(tmp_path: Path) -> None:
    """Every key of the Rust config is one jwtlet reads, the pool keys included; the Vault key is ``signing-pc``."""
    raw = tomllib.loads(rust_configs()[1])
    config, problems = read(raw, known_plugins=known_plugins(discover()))
    assert problems == []
    assert config.signer.type == "vault-transit" and config.storage_backend.type == "postgres"
    assert parse_options(raw["vault"], False, config.token.participant_context_claim).key_name == "signing-pc"
    ca = tmp_path / "db-ca.crt"
    ca.write_text("")
    pool = dict(raw["storage_backend"]["pool"], ssl_root_cert=str(ca))
    from twisted.internet import reactor

    checking = types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=str(tmp_path), check_only=True)
    store = postgres.build({"url": raw["storage_backend"]["url"], "pool": pool}, checking)
    assert store.pool_options.max_lifetime == 5400


# -- Mozambigue ----------------------------------------------------------------------------------


def test_the_mozambigue_audiences_become_client_audience_and_the_service_may_introspect() -> None:
    found = manifests("Mozambigue")
    before = env_of(container(found.find("before", "Deployment", "cart"), "cart"))
    after_deployment = found.find("after", "Deployment", "cart")
    raw = yaml.safe_load(found.find("after", "ConfigMap", "jwtlet-config")["data"]["config.yaml"])
    config, problems = read(raw, known_plugins=known_plugins(discover()))
    assert problems == []
    assert list(config.token.client_audience) == before["TOKEN_AUDIENCES"].split(",")
    account = f"system:serviceaccount:shop:{after_deployment['spec']['template']['spec']['serviceAccountName']}"
    assert "jwtlet:introspect" in config.service_accounts[account]
    volumes = after_deployment["spec"]["template"]["spec"]["volumes"]
    audiences = {source["serviceAccountToken"]["audience"]
                 for volume in volumes for source in volume.get("projected", {}).get("sources", [])}
    assert audiences and audiences <= set(config.management_client_audience), (
        "the service's own token is for the audience introspection callers are checked against")
    assert env_of(container(after_deployment, "cart"))["INTROSPECTION_URL"].endswith(":8080/introspect")


# -- jwt-generator -------------------------------------------------------------------------------


def test_the_jwt_generator_environment_carries_over_and_the_token_is_group_readable(tmp_path: Path) -> None:
    """The after manifest's init container, run as written (output redirected), writes a 0640 token."""
    found = manifests("jwt-generator")
    old = container(found.find("before", "Deployment", "hello"), "jwt-generator", init=True)
    deployment = found.find("after", "Deployment", "hello")
    new = container(deployment, "jwt-generator", init=True)
    assert set(env_of(old)) <= set(env_of(new)) and old["envFrom"] == new["envFrom"]
    assert new["command"] == ["jwtlet", "mint"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
    app = container(deployment, "hello")
    assert app["securityContext"]["runAsUser"] != new["securityContext"]["runAsUser"], "another uid reads it"
    secret = found.find("after", "Secret", "jwt-secret")["stringData"]
    environ = {**env_of(new), **secret, "OUTPUT_PATH": str(tmp_path / "token.jwt")}
    assert mint.mint(new["command"][2:], environ) == 0
    assert stat.S_IMODE((tmp_path / "token.jwt").stat().st_mode) == 0o640


def test_the_jwt_generator_secret_of_before_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = manifests("jwt-generator")
    old = container(found.find("before", "Deployment", "hello"), "jwt-generator", init=True)
    secret = found.find("before", "Secret", "jwt-secret")["stringData"]
    environ = {**env_of(old), **secret, "OUTPUT_PATH": str(tmp_path / "token.jwt")}
    assert mint.mint([], environ) == 2
    assert "openssl rand -base64 48" in capsys.readouterr().err
    assert "openssl rand -base64 48" in subsection("jwt-generator", "What jwtlet refuses on purpose")


# -- Tokensmith ----------------------------------------------------------------------------------


def a_ca_certificate() -> bytes:
    """A throwaway self-signed certificate (PEM), standing in for the guide's placeholder CA data."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eks")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


def mounted_file(deployment: dict[str, Any], container_name: str, secret: str, key: str) -> str:
    """Where ``container_name`` sees ``key`` of the Secret ``secret``."""
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == secret]
    (mount,) = [m for m in container(deployment, container_name)["volumeMounts"] if m["name"] == volume]
    return f"{mount['mountPath']}/{key}"


def test_the_tokensmith_flags_become_the_ext_authz_table_on_the_same_kubeconfig(tmp_path: Path) -> None:
    """
    ``--workload-kubeconfig``, ``--port`` and ``--token-expiration`` of the before manifest are the
    after config's kubeconfig (the same Secret, mounted where the config says), gRPC port and token
    lifetime; the config loads with that kubeconfig (its placeholder CA replaced by a real one).
    """
    found = manifests("Tokensmith")
    args = container(found.find("before", "Deployment", "tokensmith"), "tokensmith")["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    after = found.find("after", "Deployment", "tokensmith")
    path = mounted_file(after, "jwtlet", "workload-kubeconfig", "kubeconfig")
    assert path.rsplit("/", 1)[1] == flags["--workload-kubeconfig"].rsplit("/", 1)[1]
    raw = yaml.safe_load(found.find("after", "ConfigMap", "jwtlet-config")["data"]["config.yaml"])
    assert raw["k8s"]["kubeconfig"] == raw["ext_authz"]["validator"]["kubeconfig"] == path
    kubeconfig = yaml.safe_load(found.find("before", "Secret", "workload-kubeconfig")["stringData"]["kubeconfig"])
    kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(a_ca_certificate()).decode()
    local = tmp_path / "kubeconfig"
    local.write_text(yaml.safe_dump(kubeconfig))
    raw["k8s"]["kubeconfig"] = raw["ext_authz"]["validator"]["kubeconfig"] = str(local)
    config, problems = read(raw, known_plugins=known_plugins(discover()))
    assert problems == []
    assert config.ext_authz is not None and config.ext_authz.target_cluster is not None
    assert grpc_address(config.ext_authz.grpc_endpoint or "").endswith(f":{flags['--port']}")
    assert config.ext_authz.target_cluster.expiration_secs == int(flags["--token-expiration"])


# -- M-Lab ------------------------------------------------------------------------------------


def test_the_mlab_service_becomes_two_profiles_signing_with_the_same_key() -> None:
    found = manifests("M-Lab token-exchange")
    (service,) = found.before
    (old,) = service["spec"]["template"]["spec"]["containers"]
    raw = yaml.safe_load(found.find("after", "ConfigMap", "jwtlet-config")["data"]["config.yaml"])
    config, problems = read(raw, known_plugins=known_plugins(discover()))
    assert problems == []
    assert config.signer.options["key_file"] == env_of(old)["PRIVATE_KEY_PATH"]
    after = found.find("after", "Deployment", "token-exchange")
    assert mounted_file(after, "jwtlet", "jwk-priv", "jwk-priv.json") == env_of(old)["PRIVATE_KEY_PATH"]
    assert config.api_keys is not None and config.api_keys.prefix == "mlabk"
    profiles = config.api_keys.profiles
    assert {name: (p.audience, p.ttl_secs, p.issuer) for name, p in profiles.items()} == {
        "integration": ("integration", 20, "token-exchange"), "autojoin": ("autojoin", 3600, "token-exchange")}
    assert "org" in profiles["autojoin"].claims
