"""The configuration reference cannot drift from the configuration classes."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from jwtlet.config import schema as config
from jwtlet.plugins import kubernetes_oidc, vault_transit

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

SECTIONS = {
    "": config.Config,
    "k8s": config.K8sConfig,
    "token": config.TokenConfig,
    "rate_limits": config.RateLimits,
    "limits": config.LimitsConfig,
    "management": config.ManagementConfig,
    "metrics": config.MetricsConfig,
    "logging": config.LoggingConfig,
    "api_keys": config.ApiKeysConfig,
    "ext_authz": config.ExtAuthzConfig,
}
# Fields of the parsed config that are not keys of the file.
NOT_KEYS = {"dev", "data_dir", "storage_backend", "validator", "signer", "token", "k8s", "rate_limits",
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
    for section, keys in documented_tables().items():
        if section in ("storage_backend", "validator", "signer"):
            continue  # plugin sections: their options are checked by each plugin
        fields = {field.name for field in attrs.fields(SECTIONS[section])}
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


def test_every_option_the_oidc_validator_and_the_vault_signer_accept_is_documented() -> None:
    """Plugin options are not attrs fields: read them from what each plugin accepts."""
    accepted = {
        "validator": kubernetes_oidc._TOP_KEYS | kubernetes_oidc._ISSUER_KEYS,
        "signer": vault_transit._OPTIONS - {"type"},
    }
    for section, keys in accepted.items():
        text = section_text(section)
        assert not {key for key in keys if not re.search(rf"\b{key}\b", text)}, section
