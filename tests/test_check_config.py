"""
``jwtlet check-config`` runs every check the daemon runs at start: the core
schema, each plugin's own options (providers built with ``check_only``), the
endpoints; it lists every problem in one run and creates nothing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.testing import MemoryReactorClock

from jwtlet import keys
from jwtlet.cli import main as cli
from jwtlet.config import ConfigError
from jwtlet.daemon import wiring

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
    config, discovered = wiring.load_checked(str(path), {})
    with pytest.raises(ConfigError) as raised:
        wiring.make_service(config, discovered, MemoryReactorClock())
    assert raised.value.problems == lines


def test_postgres_without_url_is_listed_with_the_other_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 #3: the missing url is not held back until the rest of the config is fixed."""
    path = write(tmp_path, issuer=None, storage_backend={"type": "postgres"})
    status, lines = check(capsys, "--config", str(path))
    assert (status, lines) == (1, ["issuer: required",
                                   "storage_backend.url: required for the postgres store (a libpq URL)"])


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


HTTPS_ONLY = "must be https (http is allowed only for loopback hosts or with --dev)"


def test_every_load_time_rule_is_listed_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """config.md's load-time rules, all broken at once: one run lists every one, each plugin's requirements too."""
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump({
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
    }))
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert lines[:7] == [
        f"issuer: {HTTPS_ONLY}",
        "management_port: must differ from token_exchange_port (8080)",
        f"k8s.api_server_url: {HTTPS_ONLY}",
        "token.participant_context_claim: 'iss' is a reserved claim name",
        "token.token_ttl_secs: must be between 1 and 86400",
        "ext_authz.target_cluster.expiration_secs: must be at least 600 (Kubernetes refuses less)",
        "validator.type: no validator plugin named 'kubernetes-magic' "
        "(found: api-key, jwt-authenticator, kubernetes-oidc, kubernetes-tokenreview)",
    ]
    # The plugins' own requirements, reported by the plugins (their wording), in the same run.
    assert any(line.startswith("storage_backend.url: required") for line in lines), lines
    assert any(line.startswith("vault.url: required") for line in lines), lines
    assert any(line.startswith("vault.") and "give exactly one" in line for line in lines), lines


def test_a_tokenreview_validator_without_an_api_server_is_listed_with_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, issuer=None, validator={"type": "kubernetes-tokenreview"})
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert lines[0] == "issuer: required"
    assert lines[1].startswith("validator.api_server_url: required"), lines


def test_a_broken_k8s_kubeconfig_is_listed_once_where_it_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TokenReview validator falls back to the k8s table's kubeconfig; its problem is said once, as k8s's."""
    broken = tmp_path / "broken.kubeconfig"
    broken.write_text("not: [yaml")
    path = write(tmp_path, validator={"type": "kubernetes-tokenreview"}, k8s={"kubeconfig": str(broken)})
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert [line for line in lines if "kubeconfig" in line] == [f"k8s.kubeconfig: {broken}: not YAML"]


def test_a_broken_validator_kubeconfig_is_listed_as_the_validators(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.kubeconfig"
    broken.write_text("not: [yaml")
    path = write(tmp_path, validator={"type": "kubernetes-tokenreview", "kubeconfig": str(broken)})
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert [line for line in lines if "kubeconfig" in line] == [f"validator.kubeconfig: {broken}: not YAML"]


def test_a_plugins_http_api_server_is_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A TokenReview URL sending our service-account token in clear to a remote host is refused, at every place."""
    path = write(
        tmp_path,
        validator={"type": "kubernetes-tokenreview", "api_server_url": "http://cluster.example:6444"},
        ext_authz={"validator": {"type": "kubernetes-tokenreview", "api_server_url": "http://cluster.example:6445"},
                   "target_cluster": {"api_server_url": "https://target.example"}},
    )
    status, lines = check(capsys, "--config", str(path))
    assert status == 1
    assert [line.split(":")[0] for line in lines] == ["validator.api_server_url", "ext_authz.validator.api_server_url"]
    assert all("must be https" in line for line in lines), lines


OWNED_TABLE_SIGNER = textwrap.dedent(
    '''
    from twisted.internet.defer import succeed
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from jwtlet.interfaces import ISigner, ISignerFactory, PluginConfigError


    @implementer(ISigner)
    class NullSigner:
        algorithm = "EdDSA"

        def sign(self, header, claims):
            return succeed("")

        def public_jwks(self):
            return succeed({"keys": []})


    @implementer(IPlugin, ISignerFactory)
    class HsmSignerFactory:
        name = "hsm-test"
        description = "a signer whose options live in a top-level table (tests)"
        table = "hsm"

        def build(self, options, context):
            unknown = sorted(set(options) - {"slot"})
            if unknown or "slot" not in options:
                raise PluginConfigError(*(f"{k}: unknown key" for k in unknown),
                                        *(["slot: required"] if "slot" not in options else []))
            return NullSigner()


    hsm_test = HsmSignerFactory()
    '''
)


def test_a_plugin_owning_a_top_level_table_is_the_default_and_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Generic ownership (what vault-transit does with `vault`): the table names its plugin the default signer,
    the plugin gets the table's options with its section's on top, and each problem is named where it was written.
    """
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "hsm_test_signer.py").write_text(OWNED_TABLE_SIGNER)
    good = write(tmp_path, plugin_dirs=[str(plugins)], signer=None, hsm={"slot": 1})
    assert check(capsys, "--config", str(good)) == (0, ["configuration OK"])
    config, _ = wiring.load_checked(str(good), {})
    assert config.signer.type == "hsm-test"
    bad = write(tmp_path, plugin_dirs=[str(plugins)], signer={"type": "hsm-test", "pin": "1234"},
                hsm={"colour": "blue"})
    status, lines = check(capsys, "--config", str(bad))
    assert status == 1
    assert sorted(lines) == ["hsm.colour: unknown key", "hsm.slot: required", "signer.pin: unknown key"]


def test_dev_beyond_loopback_is_said_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both listeners are made of `bind`: the problem is `bind`'s, not repeated for each endpoint."""
    monkeypatch.setenv("JWTLET__BIND", "0.0.0.0")  # noqa: S104 - the address under test
    status, lines = check(capsys, "--dev", "--data-dir", str(tmp_path / "dev"))
    assert (status, lines) == (1, ["bind: --dev listens on loopback only, not 0.0.0.0"])
    monkeypatch.setenv("JWTLET__BIND", "127.0.0.1")
    monkeypatch.setenv("JWTLET__MANAGEMENT_ENDPOINT", "tcp:8081:interface=0.0.0.0")
    assert check(capsys, "--dev", "--data-dir", str(tmp_path / "dev")) == (
        1, ["management_endpoint: --dev listens on loopback only"])


# -- security.md's rules on the ext_authz validator, over what the built validators say they trust --------


def _two_fronts(tmp_path: Path, top: tuple[str, str], front: tuple[str, str]) -> Path:
    """A top-level and an ext_authz kubernetes-oidc validator, each trusting one (issuer, prefix), exchange jwt."""
    return write(
        tmp_path,
        validator={"type": "kubernetes-oidc",
                   "issuers": [{"issuer": top[0], "jwks_file": "/j", "username_prefix": top[1]}]},
        ext_authz={"validator": {"type": "kubernetes-oidc",
                                 "issuers": [{"issuer": front[0], "jwks_file": "/j", "username_prefix": front[1]}]},
                   "audience": "https://kubernetes.default.svc", "exchange": "jwt"},
    )


def test_an_ext_authz_validator_trusting_another_cluster_needs_its_own_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cluster B behind the ext_authz front must not mint identities that look like cluster A's."""
    status, lines = check(capsys, "--config", str(_two_fronts(tmp_path, ("https://a.example", ""),
                                                               ("https://b.example", ""))))
    assert (status, lines) == (1, [
        "ext_authz.validator.issuers[0].username_prefix: '' is also the prefix of validator.issuers[0].username_prefix "
        "for another issuer; each trusted issuer needs its own, or one cluster's service accounts act as another's"
    ])
    ok = (0, ["configuration OK"])
    assert check(capsys, "--config", str(_two_fronts(tmp_path, ("https://a.example", ""),
                                                      ("https://b.example", "b:")))) == ok
    # The same cluster trusted by both with the same prefix is one identity space.
    assert check(capsys, "--config", str(_two_fronts(tmp_path, ("https://a.example", ""),
                                                      ("https://a.example", "")))) == ok


def test_two_clusters_sharing_an_issuer_name_with_different_keys_need_their_own_prefixes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Both clusters use the default issuer name; their keys come from different places, so tokens of each
    verify only against their own cluster: without distinct prefixes B's apps/web would act as A's.
    """
    issuer = "https://kubernetes.default.svc.cluster.local"

    def fronts(top_keys: str, front_keys: str, front_prefix: str) -> Path:
        return write(
            tmp_path,
            validator={"type": "kubernetes-oidc", "issuers": [{"issuer": issuer, "jwks_file": top_keys}]},
            ext_authz={"validator": {"type": "kubernetes-oidc", "issuers": [
                {"issuer": issuer, "jwks_file": front_keys, "username_prefix": front_prefix}]},
                       "audience": "https://kubernetes.default.svc", "exchange": "jwt"},
        )

    status, lines = check(capsys, "--config", str(fronts("/cluster-a.jwks", "/cluster-b.jwks", "")))
    assert status == 1 and lines[0].startswith("ext_authz.validator.issuers[0].username_prefix: ''"), lines
    ok = (0, ["configuration OK"])
    assert check(capsys, "--config", str(fronts("/cluster-a.jwks", "/cluster-b.jwks", "b:"))) == ok
    assert check(capsys, "--config", str(fronts("/cluster-a.jwks", "/cluster-a.jwks", ""))) == ok


def test_a_tokenreview_front_asking_another_api_server_needs_its_own_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    An operator points the ext_authz TokenReview validator at cluster B's API server beside the top-level one
    asking cluster A's: both stamp k8s.cluster_issuer, so only a prefix keeps B's apps/web from being A's.
    """
    def front(url: str, prefix: str) -> Path:
        return write(
            tmp_path,
            k8s={"api_server_url": "https://a.example:6443", "token_file": "/own"},
            validator={"type": "kubernetes-tokenreview"},
            ext_authz={"validator": {"type": "kubernetes-tokenreview", "api_server_url": url,
                                     "username_prefix": prefix}, "exchange": "jwt"},
        )

    assert check(capsys, "--config", str(front("https://b.example:6443", ""))) == (1, [
        "ext_authz.validator.username_prefix: '' is also the prefix of validator.username_prefix for another "
        "issuer; each trusted issuer needs its own, or one cluster's service accounts act as another's"
    ])
    assert check(capsys, "--config", str(front("https://b.example:6443", "b:"))) == (0, ["configuration OK"])
    assert check(capsys, "--config", str(front("https://a.example:6443", ""))) == (0, ["configuration OK"])


THIRD_PARTY_VALIDATOR = textwrap.dedent(
    '''
    import attrs
    from twisted.internet.defer import fail
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from jwtlet.interfaces import ITrustedIssuers, IValidator, IValidatorFactory, TokenRejected, TrustedIssuer


    @implementer(IValidator, ITrustedIssuers)
    class PartnerValidator:
        needs_explicit_audience = True

        def validate(self, token, audience):
            return fail(TokenRejected("tests"))

        def trusted_issuers(self):
            return [TrustedIssuer("https://partner-1", "p1:", "partners[0].prefix"),
                    TrustedIssuer("https://partner-2", "p2:", "partners[1].prefix")]


    @implementer(IPlugin, IValidatorFactory)
    class PartnerValidatorFactory:
        name = "partner-test"
        description = "a validator trusting two issuers that checks aud only when given one (tests)"

        def build(self, options, context):
            return PartnerValidator()


    partner_test = PartnerValidatorFactory()
    '''
)


def test_the_front_rules_hold_for_any_validator_that_says_whom_it_trusts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    No validator names in the core: a third-party validator saying it checks aud only when given one and trusts
    two issuers gets the same audience and source_issuers rules as kubernetes-oidc.
    """
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "partner_test_validator.py").write_text(THIRD_PARTY_VALIDATOR)
    front = {"validator": {"type": "partner-test"}, "target_cluster": {"api_server_url": "https://target.example"}}
    status, lines = check(capsys, "--config", str(write(tmp_path, plugin_dirs=[str(plugins)], ext_authz=front)))
    assert (status, lines) == (1, [
        "ext_authz.audience: required when the ext_authz validator is partner-test "
        "(a token minted for another relying party must never be swapped)",
        "ext_authz.source_issuers: required when the ext_authz validator trusts more than one issuer",
    ])
    fixed = {**front, "audience": "https://workload", "source_issuers": ["https://partner-1", "https://partner-3"]}
    status, lines = check(capsys, "--config", str(write(tmp_path, plugin_dirs=[str(plugins)], ext_authz=fixed)))
    assert (status, lines) == (1, [
        "ext_authz.source_issuers: 'https://partner-3' is not one of ext_authz.validator.issuers"])
