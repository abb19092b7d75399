"""Every rule of config.md: sources, overrides, validation, defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jwtlet.config import schema as config
from jwtlet.config.schema import ConfigError, KnownPlugins

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
    }
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
    assert parsed.management_client_audience == "https://kubernetes.default.svc.cluster.local"
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


def test_tokenreview_needs_an_api_server_but_oidc_does_not() -> None:
    raw = dict(MINIMAL)
    raw.pop("k8s")
    assert problems_of(raw) == ["k8s.api_server_url: required by the kubernetes-tokenreview validator"]
    raw["validator"] = {"type": "kubernetes-oidc", "issuers": []}
    assert config.parse(raw).validator.options == {"issuers": []}


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
    parsed = config.parse(raw)
    assert parsed.signer.type == "vault-transit"
    assert parsed.vault == {"url": "http://127.0.0.1:8200", "token_file": "/vault/token"}


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
    problems = pytest.raises(ConfigError, config.load, str(rust), {}).value.problems
    assert problems == ["issuer: required"]
    parsed = config.load(str(rust), {"JWTLET__ISSUER": "https://jwtlet.example.com"})
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
    parsed = config.load(None, {}, dev=True, data_dir=str(tmp_path))
    assert parsed.issuer == "http://127.0.0.1:8080"
    assert parsed.bind == "127.0.0.1"
    assert parsed.validator.type == "kubernetes-oidc"
    assert parsed.validator.options["issuers"] == [
        {"issuer": config.DEV_ISSUER, "jwks_file": str(tmp_path / config.DEV_ISSUER_JWKS)}
    ]
    assert (parsed.token.client_audience, parsed.token.audience) == ("jwtlet-dev", "jwtlet-dev-service")
    assert parsed.storage_backend.options["path"] == str(tmp_path / "jwtlet.sqlite3")
    assert parsed.service_accounts == {config.DEV_ADMIN: ("management:write",)}
    with pytest.raises(ConfigError) as raised:
        config.load(None, {"JWTLET__BIND": "0.0.0.0"}, dev=True, data_dir=str(tmp_path))
    assert raised.value.problems == ["bind: --dev listens on loopback only, not 0.0.0.0"]


def test_env_overrides_ignore_malformed_names() -> None:
    assert config.env_overrides({"JWTLET__": "1", "JWTLET__A____B": "2", "JWTLET_X": "3"}) == {}
    assert config.env_overrides({"JWTLET__A__B": "x: y"}) == {"a": {"b": {"x": "y"}}}


HTTPS_ONLY = "must be https (http is allowed only for loopback hosts or with --dev)"


def test_every_outbound_url_is_https_and_each_violation_is_listed() -> None:
    """Each API server URL that gets a service-account token is https, or http only to loopback or in --dev."""
    def urls(scheme_host: str) -> dict[str, Any]:
        return with_(
            k8s={"api_server_url": f"{scheme_host}:6443"},
            validator={"type": "kubernetes-tokenreview", "api_server_url": f"{scheme_host}:6444"},
            ext_authz={"validator": {"type": "kubernetes-tokenreview", "api_server_url": f"{scheme_host}:6445"},
                       "target_cluster": {"api_server_url": f"{scheme_host}:6446"}},
        )

    assert problems_of(urls("http://cluster.example")) == [
        f"k8s.api_server_url: {HTTPS_ONLY}",
        f"ext_authz.target_cluster.api_server_url: {HTTPS_ONLY}",
        f"validator.api_server_url: {HTTPS_ONLY}",
        f"ext_authz.validator.api_server_url: {HTTPS_ONLY}",
    ]
    for allowed in ("https://cluster.example", "http://127.0.0.1", "http://localhost", "http://[::1]"):
        config.parse(urls(allowed))
    config.parse(dict(urls("http://cluster.example"), bind="127.0.0.1"), dev=True)


def test_every_load_time_rule_is_listed_in_one_run() -> None:
    """config.md's load-time rules, all broken at once: one run lists every one, plugin requirements too."""
    raw = {
        "issuer": "http://jwtlet.example",
        "management_port": 8080,
        "k8s": {"api_server_url": "http://kubernetes.example"},
        "token": {"client_audience": "ca", "audience": "svc", "participant_context_claim": "iss",
                  "token_ttl_secs": 0},
        "storage_backend": {"type": "postgres"},
        "validator": {"type": "kubernetes-magic"},
        "signer": {"type": "vault-transit"},
        "vault": {"token": "s.dev", "token_file": "/vault/token"},
        "ext_authz": {"target_cluster": {"api_server_url": "https://mgmt.example", "expiration_secs": 60}},
    }
    assert problems_of(raw, known_plugins=KNOWN) == [
        f"issuer: {HTTPS_ONLY}",
        "management_port: must differ from token_exchange_port (8080)",
        f"k8s.api_server_url: {HTTPS_ONLY}",
        "token.participant_context_claim: 'iss' is a reserved claim name",
        "token.token_ttl_secs: must be between 1 and 86400",
        "ext_authz.target_cluster.expiration_secs: must be at least 600 (Kubernetes refuses less)",
        "storage_backend.url: required for the postgres store",
        "vault.url: required for vault-transit",
        "vault: give exactly one of token, token_file, kubernetes_auth (given: token, token_file)",
        "validator.type: no validator plugin named 'kubernetes-magic' "
        "(found: kubernetes-oidc, kubernetes-tokenreview)",
    ]


def test_vault_transit_options_may_sit_in_the_signer_section() -> None:
    raw = with_(signer={"type": "vault-transit", "url": "https://vault:8200", "kubernetes_auth": {"role": "j"}})
    assert config.parse(raw).signer.options == {"url": "https://vault:8200", "kubernetes_auth": {"role": "j"}}
    assert problems_of(with_(signer={"type": "vault-transit"})) == [
        "vault.url: required for vault-transit",
        "vault: give exactly one of token, token_file, kubernetes_auth (given: none)",
    ]


def _two_fronts(top_issuer: str, top_prefix: str, front_issuer: str, front_prefix: str) -> dict[str, Any]:
    return with_(
        validator={"type": "kubernetes-oidc",
                   "issuers": [{"issuer": top_issuer, "username_prefix": top_prefix}]},
        ext_authz={"validator": {"type": "kubernetes-oidc",
                                 "issuers": [{"issuer": front_issuer, "username_prefix": front_prefix}]},
                   "audience": "https://kubernetes.default.svc",
                   "exchange": "jwt"},
    )


def test_an_ext_authz_validator_trusting_another_cluster_needs_its_own_prefix() -> None:
    """Cluster B behind the ext_authz front must not mint identities that look like cluster A's."""
    collision = problems_of(_two_fronts("https://a.example", "", "https://b.example", ""))
    assert any(p.startswith("ext_authz.validator.issuers[0].username_prefix:") for p in collision), collision
    config.parse(_two_fronts("https://a.example", "", "https://b.example", "b:"))
    # The same cluster trusted by both with the same prefix is one identity space.
    config.parse(_two_fronts("https://a.example", "", "https://a.example", ""))
