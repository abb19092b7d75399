"""Every rule of config.md: sources, overrides, validation, defaults."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from jwtlet import config
from jwtlet.config import ConfigError, KnownPlugins
from jwtlet.daemon import dev
from jwtlet.daemon.wiring import load_checked

MINIMAL = {
    "issuer": "https://jwtlet.example.com",
    "k8s": {"api_server_url": "https://kubernetes.default.svc"},
    "token": {"client_audience": "https://kubernetes.default.svc.cluster.local", "audience": "svc"},
    "signer": {"type": "local-key"},
}

KNOWN = KnownPlugins(
    names={
        "store": frozenset({"memory", "sqlite", "postgres"}),
        "validator": frozenset({"kubernetes-tokenreview", "kubernetes-oidc"}),
        "signer": frozenset({"local-key", "vault-transit"}),
    },
    tables={"vault": ("signer", "vault-transit")},
)


def problems_of(raw: dict[str, Any], **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        config.parse(raw, **kwargs)
    return raised.value.problems


def with_(**changes: Any) -> dict[str, Any]:
    return config.merge(MINIMAL, changes)


def test_minimal_config_gets_the_documented_defaults() -> None:
    parsed = config.parse(MINIMAL, known_plugins=KNOWN)
    assert parsed.bind == "0.0.0.0"
    assert (parsed.token_exchange_port, parsed.management_port) == (8080, 8081)
    assert parsed.storage_backend.type == "sqlite"
    assert parsed.validator.type == "kubernetes-tokenreview"
    assert parsed.token.participant_context_claim == "jwtlet_pc"
    assert parsed.token.token_ttl_secs == 3600
    assert parsed.token.require_subject_token_type is False
    assert parsed.management_client_audience == ("https://kubernetes.default.svc.cluster.local",)
    assert parsed.metrics.enabled is True
    assert parsed.logging.format == "json"
    assert parsed.token_exchange_description() == "tcp:8080:interface=0.0.0.0"


def test_all_problems_are_reported_together_with_key_paths() -> None:
    problems = problems_of(
        {
            "token_exchange_port": 0,
            "management_port": "x",
            "colour": "blue",
            "token": {"participant_context_claim": "sub", "token_ttl_secs": 90000, "extra": 1},
            "k8s": {"api_server_url": "http://kubernetes.example.com"},
        }
    )
    assert problems == [
        "issuer: required",
        "token_exchange_port: must be between 1 and 65535",
        "management_port: must be an integer, not str",
        "k8s.api_server_url: must be https (http is allowed only for loopback hosts or with --dev)",
        "token.client_audience: required",
        "token.audience: required",
        "token.participant_context_claim: 'sub' is a reserved claim name",
        "token.token_ttl_secs: must be between 1 and 86400",
        "token.extra: unknown key",
        "signer.type: required",
        "colour: unknown key",
    ]


def test_ports_must_differ_and_the_message_names_management_port() -> None:
    assert problems_of(with_(management_port=8080)) == [
        "management_port: must differ from token_exchange_port (8080)"
    ]


@pytest.mark.parametrize(
    "issuer, ok",
    [
        ("https://jwtlet.example.com", True),
        ("http://127.0.0.1:8080", True),
        ("http://localhost:8080", True),
        ("http://[::1]:8080", True),
        ("http://jwtlet.example.com", False),
        ("jwtlet.example.com", False),
        ("ftp://jwtlet.example.com", False),
    ],
)
def test_issuer_is_absolute_https_or_loopback_http(issuer: str, ok: bool) -> None:
    raw = with_(issuer=issuer)
    if ok:
        assert config.parse(raw).issuer == issuer
    else:
        assert problems_of(raw)[0].startswith("issuer: must be")


def test_reserved_participant_context_claims_are_refused() -> None:
    for claim in ("iss", "sub", "aud", "exp", "nbf", "iat", "jti", "act"):
        raw = with_(token={"participant_context_claim": claim})
        assert problems_of(raw) == [f"token.participant_context_claim: '{claim}' is a reserved claim name"]


def test_the_k8s_table_is_optional_to_the_core() -> None:
    """Which plugin needs k8s.api_server_url is the plugin's to say (test_check_config)."""
    raw = dict(MINIMAL)
    raw.pop("k8s")
    raw["validator"] = {"type": "kubernetes-oidc", "issuers": []}
    parsed = config.parse(raw)
    assert parsed.k8s.api_server_url is None
    assert parsed.validator.options == {"issuers": []}


def test_unknown_plugin_types_list_what_was_found() -> None:
    raw = with_(storage_backend={"type": "redis"}, signer={"type": "hsm"})
    assert problems_of(raw, known_plugins=KNOWN) == [
        "storage_backend.type: no store plugin named 'redis' (found: memory, postgres, sqlite)",
        "signer.type: no signer plugin named 'hsm' (found: local-key, vault-transit)",
    ]


def test_a_plugin_that_failed_to_import_is_named_with_its_reason() -> None:
    known = KnownPlugins(names=KNOWN.names, failures={"jwtlet.plugins.hsm": "ImportError: no pkcs11"})
    assert problems_of(with_(signer={"type": "hsm"}), known_plugins=known) == [
        "signer.type: plugin 'hsm' not loaded (import failures: jwtlet.plugins.hsm: ImportError: no pkcs11)"
    ]


def test_vault_table_makes_vault_transit_the_default_signer() -> None:
    raw = dict(MINIMAL)
    raw.pop("signer")
    raw["vault"] = {"url": "http://127.0.0.1:8200", "token_file": "/vault/token"}
    parsed = config.parse(raw, known_plugins=KNOWN)
    assert parsed.signer.type == "vault-transit"
    assert parsed.tables == {"vault": {"url": "http://127.0.0.1:8200", "token_file": "/vault/token"}}


def test_the_default_signer_is_whichever_signer_plugin_owns_a_present_table() -> None:
    """The core names no plugin: an `hsm` table owned by an `hsm` signer makes it the default just the same."""
    known = KnownPlugins(names=dict(KNOWN.names, signer=frozenset({"hsm"})), tables={"hsm": ("signer", "hsm")})
    raw = {key: value for key, value in MINIMAL.items() if key != "signer"}
    assert config.parse(dict(raw, hsm={"slot": 1}), known_plugins=known).signer.type == "hsm"
    assert problems_of(raw, known_plugins=known) == ["signer.type: required"]


def test_a_table_no_plugin_owns_is_an_unknown_key() -> None:
    """A typo of a plugin's table, or a plugin that is not installed: reported, never silently ignored."""
    assert problems_of(with_(vualt={"url": "https://vault:8200"}), known_plugins=KNOWN) == ["vualt: unknown key"]
    assert problems_of(with_(vault={"url": "https://vault:8200"})) == ["vault: unknown key"]
    failed = KnownPlugins(names=KNOWN.names, failures={"jwtlet.plugins.vault_transit": "ImportError: no hvac"})
    assert problems_of(with_(vault={"url": "https://vault:8200"}), known_plugins=failed) == [
        "vault: unknown key (unless a plugin that failed to import owns it: "
        "jwtlet.plugins.vault_transit: ImportError: no hvac)"
    ]


def test_a_plugin_cannot_take_over_a_core_table() -> None:
    known = KnownPlugins(names=KNOWN.names, tables={"token": ("signer", "local-key")})
    assert config.parse(MINIMAL, known_plugins=known).tables == {}


def test_plugin_options_pass_through_to_the_plugin() -> None:
    raw = with_(storage_backend={"type": "postgres", "url": "postgresql://db/jwtlet", "pool": {"max_connections": 4}})
    section = config.parse(raw).storage_backend
    assert section.type == "postgres"
    assert section.options == {"url": "postgresql://db/jwtlet", "pool": {"max_connections": 4}}


def test_api_keys_and_ext_authz_sections() -> None:
    problems = problems_of(
        with_(
            api_keys={"prefix": "a.b", "profiles": {"integration": {"ttl_secs": 20}}},
            ext_authz={"exchange": "magic", "target_cluster": {"expiration_secs": 599}},
        )
    )
    assert problems == [
        "api_keys.prefix: must not contain '.'",
        "api_keys.profiles.integration.audience: required",
        "ext_authz.exchange: must be kubernetes-tokenrequest or jwt",
    ]
    good = config.parse(
        with_(
            api_keys={"profiles": {"integration": {"audience": "integration", "ttl_secs": 20}}},
            ext_authz={"target_cluster": {"api_server_url": "https://mgmt.example:6443"}},
        )
    )
    assert good.api_keys is not None and good.api_keys.prefix == "jwtk"
    assert good.api_keys.profiles["integration"].ttl_secs == 20
    assert good.ext_authz is not None and good.ext_authz.target_cluster is not None
    assert good.ext_authz.target_cluster.expiration_secs == 3600
    short = problems_of(
        with_(ext_authz={"target_cluster": {"api_server_url": "https://m.example", "expiration_secs": 599}})
    )
    assert short == ["ext_authz.target_cluster.expiration_secs: must be at least 600 (Kubernetes refuses less)"]


def test_yaml_and_toml_files_load_the_same_schema(tmp_path: Path) -> None:
    yaml_file = tmp_path / "jwtlet.yaml"
    yaml_file.write_text(
        "issuer: https://jwtlet.example.com\n"
        "k8s: {api_server_url: 'https://kubernetes.default.svc'}\n"
        "token: {client_audience: ca, audience: svc}\n"
        "signer: {type: local-key}\n"
    )
    toml_file = tmp_path / "config.toml"
    toml_file.write_text(
        'issuer = "https://jwtlet.example.com"\n'
        "[k8s]\napi_server_url = \"https://kubernetes.default.svc\"\n"
        '[token]\nclient_audience = "ca"\naudience = "svc"\n'
        '[signer]\ntype = "local-key"\n'
    )
    assert config.load(str(yaml_file), environ={}) == config.load(str(toml_file), environ={})


def test_rust_jwtlet_toml_loads_once_issuer_is_added(tmp_path: Path) -> None:
    rust = tmp_path / "config.toml"
    rust.write_text(
        "token_exchange_port = 8080\nmanagement_port = 8081\nbind = \"0.0.0.0\"\n"
        "[storage_backend]\ntype = \"postgres\"\nurl = \"postgresql://jwtlet@db/jwtlet\"\n"
        "run_migrations_on_startup = true\n"
        "[storage_backend.pool]\nmax_connections = 10\nacquire_timeout = \"30s\"\n"
        "[k8s]\napi_server_url = \"https://kubernetes.default.svc\"\n"
        "cluster_issuer = \"https://kubernetes.default.svc.cluster.local\"\n"
        "[token]\nclient_audience = \"https://kubernetes.default.svc.cluster.local\"\naudience = \"edc\"\n"
        "[vault]\nurl = \"http://vault:8200\"\ntoken_file = \"/vault/secrets/.vault-token\"\n"
        "[management]\nclient_audience = \"jwtlet-management\"\n"
        "[service_accounts]\n\"system:serviceaccount:platform:admin\" = [\"management:write\"]\n"
    )
    problems = pytest.raises(ConfigError, config.load, str(rust), {}, known_plugins=KNOWN).value.problems
    assert problems == ["issuer: required"]
    parsed = config.load(str(rust), {"JWTLET__ISSUER": "https://jwtlet.example.com"}, known_plugins=KNOWN)
    assert parsed.signer.type == "vault-transit"
    assert parsed.storage_backend.options["pool"] == {"max_connections": 10, "acquire_timeout": "30s"}
    assert parsed.service_accounts == {"system:serviceaccount:platform:admin": ("management:write",)}


def test_env_overrides_win_over_the_file_and_parse_as_yaml_scalars(tmp_path: Path) -> None:
    file = tmp_path / "jwtlet.yaml"
    file.write_text(
        "issuer: https://jwtlet.example.com\n"
        "k8s: {api_server_url: 'https://kubernetes.default.svc'}\n"
        "token: {client_audience: ca, audience: svc}\nsigner: {type: local-key}\n"
    )
    environ = {
        "JWTLET_CONFIG_FILE": str(file),
        "JWTLET__TOKEN_EXCHANGE_PORT": "9090",
        "JWTLET__TOKEN__AUDIENCE": "my-service",
        "JWTLET__TOKEN__REQUIRE_SUBJECT_TOKEN_TYPE": "true",
        "JWTLET__STORAGE_BACKEND__TYPE": "postgres",
        "JWTLET__STORAGE_BACKEND__URL": "postgresql://db/jwtlet",
        "JWTLET_LOG_LEVEL": "debug",
    }
    parsed = config.load(None, environ)
    assert parsed.token_exchange_port == 9090
    assert parsed.token.audience == "my-service"
    assert parsed.token.require_subject_token_type is True
    assert parsed.storage_backend.options == {"url": "postgresql://db/jwtlet"}


def test_an_env_override_can_break_a_good_file(tmp_path: Path) -> None:
    file = tmp_path / "jwtlet.yaml"
    file.write_text(
        "issuer: https://jwtlet.example.com\nk8s: {api_server_url: 'https://k.example'}\n"
        "token: {client_audience: ca, audience: svc}\nsigner: {type: local-key}\n"
    )
    with pytest.raises(ConfigError) as raised:
        config.load(str(file), {"JWTLET__MANAGEMENT_PORT": "8080", "JWTLET__TOKEN__TYPO": "1"})
    assert raised.value.problems == [
        "management_port: must differ from token_exchange_port (8080)",
        "token.typo: unknown key",
    ]


def test_unreadable_malformed_and_unknown_format_files(tmp_path: Path) -> None:
    missing = pytest.raises(ConfigError, config.load, str(tmp_path / "none.yaml"), {}).value.problems
    assert missing[0].endswith("cannot read: No such file or directory")
    bad = tmp_path / "bad.yaml"
    bad.write_text("issuer: [unclosed\n")
    assert "not valid YAML" in pytest.raises(ConfigError, config.load, str(bad), {}).value.problems[0]
    ini = tmp_path / "jwtlet.ini"
    ini.write_text("x=1")
    assert "unknown config format" in pytest.raises(ConfigError, config.load, str(ini), {}).value.problems[0]
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    assert "top level must be a table" in pytest.raises(ConfigError, config.load, str(listing), {}).value.problems[0]


def test_dev_defaults_are_complete_and_loopback_only(tmp_path: Path) -> None:
    parsed, _ = load_checked(None, {}, dev=True, data_dir=str(tmp_path))
    assert parsed.issuer == "http://127.0.0.1:8080"
    assert parsed.bind == "127.0.0.1"
    assert parsed.validator.type == "kubernetes-oidc"
    assert parsed.validator.options["issuers"] == [
        {"issuer": dev.ISSUER, "jwks_file": str(tmp_path / dev.ISSUER_JWKS)}
    ]
    assert (parsed.token.client_audience, parsed.token.audience) == (("jwtlet-dev",), "jwtlet-dev-service")
    assert parsed.storage_backend.options["path"] == str(tmp_path / "jwtlet.sqlite3")
    assert parsed.service_accounts == {dev.ADMIN: ("management:write",)}
    with pytest.raises(ConfigError) as raised:
        load_checked(None, {"JWTLET__BIND": "0.0.0.0"}, dev=True, data_dir=str(tmp_path))
    assert raised.value.problems == ["bind: --dev listens on loopback only, not 0.0.0.0"]


def test_env_overrides_ignore_malformed_names() -> None:
    assert config.env_overrides({"JWTLET__": "1", "JWTLET__A____B": "2", "JWTLET_X": "3"}) == {}
    assert config.env_overrides({"JWTLET__A__B": "x: y"}) == {"a": {"b": {"x": "y"}}}


HTTPS_ONLY = "must be https (http is allowed only for loopback hosts or with --dev)"


def test_every_outbound_url_the_core_reads_is_https_and_each_violation_is_listed() -> None:
    """
    Each API server URL the core itself reads gets a service-account token: https, or http only to loopback or in
    --dev.  (A plugin's own URLs are the plugin's to check: test_check_config lists them in the same run.)
    """
    def urls(scheme_host: str) -> dict[str, Any]:
        return with_(
            k8s={"api_server_url": f"{scheme_host}:6443"},
            ext_authz={"target_cluster": {"api_server_url": f"{scheme_host}:6446"}},
        )

    assert problems_of(urls("http://cluster.example")) == [
        f"k8s.api_server_url: {HTTPS_ONLY}",
        f"ext_authz.target_cluster.api_server_url: {HTTPS_ONLY}",
    ]
    for allowed in ("https://cluster.example", "http://127.0.0.1", "http://localhost", "http://[::1]"):
        config.parse(urls(allowed))
    config.parse(dict(urls("http://cluster.example"), bind="127.0.0.1"), dev=True)


def test_a_url_that_does_not_parse_is_a_problem_not_a_crash() -> None:
    assert problems_of(with_(issuer="http://[::1")) == ["issuer: must be an absolute https URL"]


def test_broken_values_still_give_a_whole_config_for_the_plugin_checks() -> None:
    """Issue 14 #3: config.read answers a config beside the problems, so plugins are checked in the same run."""
    checked, problems = config.read({"token_exchange_port": "x", "storage_backend": {"type": "memory", "a": 1}})
    assert problems[:2] == ["issuer: required", "token_exchange_port: must be an integer, not str"]
    assert checked.token_exchange_port == 8080
    assert checked.storage_backend.options == {"a": 1}


def test_vault_transit_options_may_sit_in_the_signer_section() -> None:
    raw = with_(signer={"type": "vault-transit", "url": "https://vault:8200", "kubernetes_auth": {"role": "j"}})
    assert config.parse(raw).signer.options == {"url": "https://vault:8200", "kubernetes_auth": {"role": "j"}}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_number_that_is_not_finite_is_a_problem(value: float) -> None:
    """YAML's .nan and .inf are floats: a rate or a ratio must still be a number one can compare."""
    with pytest.raises(ConfigError) as raised:
        config.parse(dict(MINIMAL, rate_limits={"per_client_per_sec": value}))
    assert any("rate_limits.per_client_per_sec: must be a finite number" in problem
               for problem in raised.value.problems)
