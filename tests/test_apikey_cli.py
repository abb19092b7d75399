"""``jwtlet apikey`` against a SQLite store, as an operator runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from jwtlet.apikeys import keys as apikeys
from jwtlet.testing.process import bin_path


def run(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [bin_path("jwtlet"), "apikey", *arguments], capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )


def test_create_list_revoke(tmp_path: Path) -> None:
    config = tmp_path / "jwtlet.yaml"
    config.write_text(yaml.safe_dump({
        "issuer": "https://jwtlet.example.com",
        "storage_backend": {"type": "sqlite", "path": str(tmp_path / "keys.sqlite3")},
        "validator": {"type": "kubernetes-oidc", "issuers": [{"issuer": "https://k8s.example"}]},
        "token": {"client_audience": "a", "audience": "b"},
        "signer": {"type": "local-key"},
        "api_keys": {"prefix": "acmek", "profiles": {"p": {"audience": "x"}}},
    }))
    created = run(tmp_path, "create", "--config", str(config), "--integration", "acme", "--tier", "2",
                  "--description", "ci", "--key-id", "k1")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    parsed = apikeys.parse_key(key, "acmek")
    assert parsed is not None and (parsed.integration_id, parsed.key_id) == ("acme", "k1")
    assert "shown only this once" in created.stderr
    again = run(tmp_path, "create", "--config", str(config), "--integration", "acme", "--key-id", "k1")
    assert again.returncode == 1 and "already exists" in again.stderr
    listed = run(tmp_path, "list", "--config", str(config))
    assert listed.stdout == "acme\tk1\t2\tactive\tci\n"
    assert parsed.secret not in listed.stdout
    assert run(tmp_path, "revoke", "--config", str(config), "acme", "k1").returncode == 0
    after = run(tmp_path, "list", "--config", str(config), "--integration", "acme")
    assert after.stdout == "acme\tk1\t2\trevoked\tci\n"
    missing = run(tmp_path, "revoke", "--config", str(config), "acme", "nope")
    assert missing.returncode == 1 and "no key nope" in missing.stderr
