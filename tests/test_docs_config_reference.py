"""The configuration reference cannot drift from the configuration classes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock

from jwtlet.config import SectionReader, parse, schema
from jwtlet.daemon.wiring import known_plugins
from jwtlet.discovery import discover
from jwtlet.interfaces import PluginConfigError, PluginContext
from jwtlet.plugins import kubernetes_oidc, vault_transit

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

SECTIONS = {
    "": schema.Config,
    "k8s": schema.K8sConfig,
    "token": schema.TokenConfig,
    "rate_limits": schema.RateLimits,
    "limits": schema.LimitsConfig,
    "management": schema.ManagementConfig,
    "metrics": schema.MetricsConfig,
    "logging": schema.LoggingConfig,
    "api_keys": schema.ApiKeysConfig,
    "ext_authz": schema.ExtAuthzConfig,
    "tracing": schema.TracingConfig,
}
# Fields of the parsed config that are not keys of the file.
NOT_KEYS = {"dev", "data_dir", "tables", "storage_backend", "validator", "signer", "token", "k8s", "rate_limits",
            "limits", "management", "metrics", "logging"}


def documented_tables() -> dict[str, set[str]]:
    tables: dict[str, set[str]] = {}
    current = ""
    for line in REFERENCE.read_text().splitlines():
        heading = re.match(r"^## (?:`(?P<name>[a-z0-9_]+)`|Top level)", line)
        if heading:
            current = heading.group("name") or ""
            continue
        row = re.match(r"^\| `(?P<key>[a-z0-9_]+)`", line)
        if row:
            tables.setdefault(current, set()).add(row.group("key"))
    return tables


def test_every_config_key_is_documented_in_its_section() -> None:
    tables = documented_tables()
    for section, cls in SECTIONS.items():
        fields = {field.name for field in attrs.fields(cls)} - (NOT_KEYS if section == "" else set())
        assert fields <= tables.get(section, set()), (section, fields - tables.get(section, set()))


def test_every_documented_key_exists() -> None:
    owned_tables = set(known_plugins(discover()).tables)
    for section, keys in documented_tables().items():
        if section in ("storage_backend", "validator", "signer"):
            continue  # plugin sections: their options are checked by each plugin
        fields = {field.name for field in attrs.fields(SECTIONS[section])}
        if section == "":
            fields |= owned_tables  # top-level tables a plugin owns (vault-transit's vault)
        assert keys <= fields, (section, keys - fields)


def test_documented_defaults_match_the_classes() -> None:
    text = REFERENCE.read_text()
    for section in ("k8s", "token", "limits", "logging"):
        for field in attrs.fields(SECTIONS[section]):
            if field.default is attrs.NOTHING or field.default is None:
                continue
            default = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
            assert f"| `{field.name}` | `{default}` |" in text, (section, field.name, default)


def section_text(name: str) -> str:
    """The text of one ``## `name` `` section of the reference."""
    match = re.search(rf"^## `{name}`\n(?P<body>.*?)(?=^## |\Z)", REFERENCE.read_text(), re.MULTILINE | re.DOTALL)
    assert match, name
    return match.group("body")


def keys_read_by(build: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The option names a plugin reads with the shared section reader while it is built."""
    read: set[str] = set()
    original = SectionReader.get

    def recording(self: SectionReader, key: str, *args: Any, **kwargs: Any) -> Any:
        read.add(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(SectionReader, "get", recording)
    try:
        build()
    except PluginConfigError:
        pass  # reading went on past every problem: all keys were read
    return read


def test_every_option_the_oidc_validator_and_the_vault_signer_accept_is_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plugin options are not attrs fields: read them from what each plugin accepts."""
    config = parse({"issuer": "https://jwtlet.example", "token": {"client_audience": "a", "audience": "b"},
                    "signer": {"type": "local-key"}})
    context = PluginContext(reactor=MemoryReactorClock(), clock=MemoryReactorClock(), http_client=None,
                            config=config, data_dir=tmp_path, check_only=True)
    options = {"issuers": [{"issuer": "https://k8s.example", "jwks_file": str(tmp_path / "jwks.json")}]}
    accepted = {
        "validator": keys_read_by(lambda: kubernetes_oidc.kubernetes_oidc.build(options, context), monkeypatch),
        "signer": vault_transit._OPTIONS - {"type"},
    }
    assert {"issuers", "issuer", "jwks_uri", "username_prefix", "leeway_secs"} <= accepted["validator"]
    for section, keys in accepted.items():
        text = section_text(section)
        assert not {key for key in keys if not re.search(rf"\b{key}\b", text)}, section
