"""
``jwtlet check-config`` runs every check the daemon runs at start: the core
schema, each plugin's own options (providers built with ``check_only``), the
endpoints; it lists every problem in one run and creates nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.testing import MemoryReactorClock

from jwtlet import keys
from jwtlet.cli import main as cli
from jwtlet.config.schema import ConfigError
from jwtlet.daemon import wiring as daemon

ISSUER = "https://kubernetes.default.svc.cluster.local"


def write(tmp_path: Path, **changes: Any) -> Path:
    """A valid config (memory store, kubernetes-oidc, local-key) with ``changes`` on top."""
    key = tmp_path / "signing.jwk"
    if not key.exists():
        keys.write_new(key, keys.generate("EdDSA"))
    raw: dict[str, Any] = {
        "issuer": "https://jwtlet.example.com",
        "storage_backend": {"type": "memory"},
        "validator": {"type": "kubernetes-oidc",
                      "issuers": [{"issuer": ISSUER, "jwks_file": str(tmp_path / "cluster.jwks.json")}]},
        "token": {"client_audience": ISSUER, "audience": "svc"},
        "signer": {"type": "local-key", "key_file": str(key)},
    }
    raw.update(changes)
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def check(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, list[str]]:
    """Exit status and the lines of stderr (or stdout when OK)."""
    status = cli.main(["check-config", *arguments])
    out, err = capsys.readouterr()
    return status, (err or out).splitlines()


def test_a_valid_config_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(capsys, "--config", str(write(tmp_path))) == (0, ["configuration OK"])


def test_a_plugins_own_option_typos_are_reported_not_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An operator misspells jwks_uri and adds a stray key in an issuer entry: both reported, exit 1."""
    path = write(tmp_path, validator={"type": "kubernetes-oidc", "issuers": [
        {"issuer": ISSUER, "jwks_url": "https://cluster.example/jwks", "bogus_key": 1}]})
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert "validator.issuers[0].jwks_url: unknown key" in lines
    assert "validator.issuers[0].bogus_key: unknown key" in lines


def test_check_mode_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`generate: true` and --dev's data directory are what the daemon creates, not check-config."""
    key = tmp_path / "keys" / "new.jwk"
    path = write(tmp_path, signer={"type": "local-key", "key_file": str(key), "generate": True})
    assert check(capsys, "--config", str(path)) == (0, ["configuration OK"])
    assert not key.parent.exists()
    data = tmp_path / "dev-data"
    assert check(capsys, "--dev", "--data-dir", str(data)) == (0, ["configuration OK"])
    assert not data.exists()


def test_endpoint_and_every_providers_problems_come_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        management_endpoint="nonsense:1234",
        signer={"type": "local-key", "key_file": str(tmp_path / "missing.jwk")},
        storage_backend={"type": "memory", "colour": "blue"},
        ext_authz={
            "grpc_endpoint": "unix:/run/jwtlet.sock",
            "exchange": "jwt",
            "audience": "https://workload",
            "validator": {"type": "kubernetes-oidc", "issuers": [{"issuer": ISSUER, "jwks_file": "/j", "x": 1}]},
        },
    )
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert lines[0].startswith("management_endpoint: not a Twisted endpoint description")
    assert lines[1].startswith("ext_authz.grpc_endpoint: 'unix:/run/jwtlet.sock' is not supported")
    assert lines[2] == "storage_backend.colour: unknown key"
    assert lines[3].startswith("signer.key_file: ") and "missing.jwk" in lines[3]
    assert lines[4:] == ["ext_authz.validator.issuers[0].x: unknown key"]


def test_the_daemon_reports_what_check_config_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, storage_backend={"type": "memory", "colour": "blue"}, management_endpoint="nonsense:1")
    _, lines = check(capsys, "--config", str(path))
    config, discovered = daemon.load_checked(str(path), {})
    with pytest.raises(ConfigError) as raised:
        daemon.make_service(config, discovered, MemoryReactorClock())
    assert raised.value.problems == lines


def test_postgres_without_url_is_listed_with_the_other_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 #3: the missing url is not held back until the rest of the config is fixed."""
    path = write(tmp_path, issuer=None, storage_backend={"type": "postgres"})
    status, lines = check(capsys, "--config", str(path))
    assert (status, lines) == (1, ["issuer: required", "storage_backend.url: required for the postgres store"])


def test_local_key_options_left_in_a_vault_transit_signer_are_named_where_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 #9: the operator wrote key_file under `signer`, so the message says signer.key_file."""
    path = write(
        tmp_path,
        signer={"type": "vault-transit", "key_file": "/keys/k.jwk", "generate": True},
        vault={"url": "https://vault.example:8200", "token_file": "/vault/token", "colour": "blue"},
    )
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert "signer.key_file: unknown key" in lines
    assert "signer.generate: unknown key" in lines
    assert "vault.colour: unknown key" in lines
    assert not any(line.startswith(("vault.key_file", "vault.generate")) for line in lines)


def test_dev_refuses_a_grpc_listener_beyond_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"ext_authz": {
        "grpc_endpoint": "tcp:9001:interface=0.0.0.0", "exchange": "jwt", "audience": "jwtlet-dev",
        "validator": {"type": "kubernetes-oidc", "issuers": [
            {"issuer": ISSUER, "jwks_file": "/j", "username_prefix": "front:"}]},
    }}))
    status, lines = check(capsys, "--dev", "--data-dir", str(tmp_path / "dev"), "--config", str(extra))
    assert (status, lines) == (1, ["ext_authz.grpc_endpoint: --dev listens on loopback only"])
