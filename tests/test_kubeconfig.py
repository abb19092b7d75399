"""
Kubeconfig files (migration.md, Tokensmith): one context's server, CA and
user read from the file; explicit keys, then the kubeconfig, then
in-cluster; exec credential plugins run as child processes, cached until
``expirationTimestamp`` and run again after a 401; client certificates over
TLS against the fake API server; ``check-config`` names an unreadable file
or an unknown context.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import attrs
import pytest
import pytest_twisted
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from k8s_fixtures import CLIENT_AUDIENCE, jwtlet_config
from twisted.internet import reactor, ssl
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site

from jwtlet.cli import main as cli
from jwtlet.config import ConfigError, parse
from jwtlet.config.schema import ClusterAccess, K8sConfig
from jwtlet.interfaces import DependencyUnavailable, PluginConfigError, PluginContext
from jwtlet.kubernetes import kubeconfig
from jwtlet.kubernetes.credentials import TIMEOUT_SECS, parse_exec_credential
from jwtlet.kubernetes.kubeconfig import IN_CLUSTER, KubeconfigError, UnknownContext
from jwtlet.outbound import build_http_client, close_http_client
from jwtlet.plugins.kubernetes_tokenreview import kubernetes_tokenreview
from jwtlet.testing.kubernetes import FakeKubernetes, serve_tls
from jwtlet.testing.loopback import LoopbackServer, serve

V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"


def kubeconfig_document(server: str, user: dict[str, Any], cluster: Optional[dict[str, Any]] = None,
                        context: str = "workloads") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": context, "context": {"cluster": "c", "user": "u"}},
                     {"name": "other", "context": {"cluster": "c", "user": "nobody"}}],
    }


def write_kubeconfig(directory: Path, document: dict[str, Any]) -> str:
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(document))
    return str(path)


# -- parsing ----------------------------------------------------------------------------


def test_the_current_context_is_read_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    entry = kubeconfig.parse(kubeconfig_document(
        "https://api.example:6443/", {"tokenFile": "token", "client-certificate": "/abs/cert",
                                      "client-key": "key"},
        {"certificate-authority": "ca.crt", "tls-server-name": "kubernetes"}), None, tmp_path)
    assert entry.server == "https://api.example:6443"
    assert entry.token_file == tmp_path / "token"
    assert entry.certificate_authority == kubeconfig.Material(path=tmp_path / "ca.crt")
    assert entry.client_certificate == kubeconfig.Material(path=Path("/abs/cert"))
    assert entry.client_key == kubeconfig.Material(path=tmp_path / "key")
    assert entry.tls_server_name == "kubernetes"


def test_inline_data_wins_over_a_file_as_in_client_go(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\n"
    entry = kubeconfig.parse(kubeconfig_document("https://api", {"token": "t"}, {
        "certificate-authority": "ignored", "certificate-authority-data": base64.b64encode(pem).decode()}),
        None, tmp_path)
    assert entry.certificate_authority == kubeconfig.Material(data=pem)
    assert entry.token == "t"


@pytest.mark.parametrize(("user", "cluster", "message"), [
    ({"token": "t"}, {"insecure-skip-tls-verify": True}, "insecure-skip-tls-verify: refused"),
    ({"auth-provider": {"name": "gcp"}}, {}, "use the provider's exec plugin"),
    ({"username": "admin", "password": "x"}, {}, "basic authentication was removed"),
    ({"client-certificate": "cert"}, {}, "client-certificate and client-key go together"),
    ({"exec": {"command": "x", "apiVersion": "client.authentication.k8s.io/v1alpha1"}}, {}, "apiVersion: must be"),
    ({"exec": {"command": "x", "apiVersion": V1, "interactiveMode": "Always"}}, {}, "needs a terminal"),
    ({"token": "t"}, {"certificate-authority-data": "not base64!"}, "not base64"),
], ids=["insecure", "auth-provider", "basic", "cert-without-key", "exec-version", "interactive", "bad-data"])
def test_what_jwtlet_refuses_in_a_kubeconfig_is_named(
        tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any], message: str) -> None:
    with pytest.raises(KubeconfigError, match=message):
        kubeconfig.parse(kubeconfig_document("https://api", user, cluster), None, tmp_path)


def test_an_unknown_context_is_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(UnknownContext, match="no context named 'staging'"):
        kubeconfig.parse(kubeconfig_document("https://api", {"token": "t"}), "staging", tmp_path)
    assert kubeconfig.parse(kubeconfig_document("https://api", {"token": "t"}), "workloads", tmp_path).token == "t"


def test_an_exec_plugin_in_a_relative_path_is_taken_from_the_kubeconfig_directory(tmp_path: Path) -> None:
    entry = kubeconfig.parse(kubeconfig_document("https://api", {"exec": {
        "command": "./bin/auth", "apiVersion": V1, "args": ["token"], "env": [{"name": "A", "value": "1"}]}}),
        None, tmp_path)
    assert entry.exec is not None
    assert (entry.exec.command, entry.exec.args, entry.exec.env) == (str(tmp_path / "bin/auth"), ("token",),
                                                                    (("A", "1"),))
    bare = kubeconfig.parse(kubeconfig_document("https://api", {"exec": {
        "command": "aws", "apiVersion": V1BETA1}}), None, tmp_path)
    assert bare.exec is not None and bare.exec.command == "aws"  # looked up on PATH


def test_an_exec_credential_is_read_strictly() -> None:
    def credential(**status: Any) -> bytes:
        return yaml.safe_dump({"apiVersion": V1, "kind": "ExecCredential", "status": status}).encode()

    as_json = (b'{"apiVersion": "%s", "kind": "ExecCredential", "status": {"token": "t", '
               b'"expirationTimestamp": "2030-01-01T00:00:00-08:00"}}' % V1.encode())
    assert parse_exec_credential(as_json, V1) == ("t", 1893484800.0)
    assert parse_exec_credential(as_json.replace(b', "expirationTimestamp": "2030-01-01T00:00:00-08:00"', b""),
                                 V1) == ("t", None)
    with pytest.raises(ValueError, match="another apiVersion"):
        parse_exec_credential(as_json, V1BETA1)
    with pytest.raises(ValueError, match="client certificates from exec plugins are not supported"):
        parse_exec_credential(as_json.replace(b'"token": "t"', b'"clientCertificateData": "x"'), V1)
    with pytest.raises(ValueError) as raised:
        parse_exec_credential(credential(token="secret-value"), V1)  # YAML, not JSON
    assert "secret-value" not in str(raised.value)


# -- precedence -------------------------------------------------------------------------


async def resolved(*layers: ClusterAccess) -> tuple[Optional[str], Optional[str], bool]:
    cluster = kubeconfig.resolve(layers, reactor, Clock())
    return cluster.url, await cluster.credential.bearer(), cluster.from_kubeconfig


@pytest_twisted.ensureDeferred
async def test_explicit_keys_then_the_kubeconfig_then_the_next_layer(tmp_path: Path) -> None:
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://from-kubeconfig", {"token": "kc-token"}))
    own = tmp_path / "own-token"
    own.write_text("explicit-token")
    # The kubeconfig over in-cluster: a pod's mounted token does not shadow it.
    assert await resolved(ClusterAccess(kubeconfig=config), IN_CLUSTER) == (
        "https://from-kubeconfig", "kc-token", True)
    # Explicit keys over the kubeconfig, each on its own.
    assert await resolved(ClusterAccess(api_server_url="https://explicit", kubeconfig=config), IN_CLUSTER) == (
        "https://explicit", "kc-token", True)
    assert await resolved(ClusterAccess(token_file=str(own), kubeconfig=config), IN_CLUSTER) == (
        "https://from-kubeconfig", "explicit-token", True)
    # A validator's own kubeconfig over the k8s table's keys.
    k8s = K8sConfig(api_server_url="https://k8s-table", token_file=str(own))
    assert await resolved(ClusterAccess(kubeconfig=config), k8s.access(), IN_CLUSTER) == (
        "https://from-kubeconfig", "kc-token", True)
    # Without any kubeconfig: the keys, then in-cluster, as before kubeconfigs existed.
    assert await resolved(k8s.access(), IN_CLUSTER) == ("https://k8s-table", "explicit-token", False)


def test_the_k8s_table_kubeconfig_beside_in_cluster_defaults_supplies_the_credential(tmp_path: Path) -> None:
    """``token_file`` and ``ca_file`` at their in-cluster defaults are the in-cluster layer, not explicit keys."""
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://api", {"token": "t"}))
    parsed = parse({"issuer": "https://jwtlet.example", "token": {"client_audience": "a", "audience": "b"},
                    "signer": {"type": "local-key"}, "k8s": {"kubeconfig": config, "context": "workloads"}})
    assert parsed.k8s.access() == ClusterAccess(kubeconfig=config, context="workloads")


# -- what check-config says --------------------------------------------------------------


def config_with(k8s: dict[str, Any], dev: bool = False) -> list[str]:
    raw = {"issuer": "https://jwtlet.example", "token": {"client_audience": "a", "audience": "b"},
           "signer": {"type": "local-key"}, "k8s": k8s, "bind": "127.0.0.1"}
    try:
        parse(raw, dev=dev)
    except ConfigError as error:
        return list(error.problems)
    return []


def test_check_config_names_an_unreadable_kubeconfig_and_an_unknown_context(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    assert config_with({"kubeconfig": missing}) == [f"k8s.kubeconfig: {missing}: cannot read it (FileNotFoundError)"]
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://api", {"token": "t"}))
    assert config_with({"kubeconfig": config, "context": "staging"}) == [
        f"k8s.context: {config}: no context named 'staging'"]
    assert config_with({"context": "workloads"}) == ["k8s.context: needs kubeconfig"]
    assert config_with({"kubeconfig": config}) == []


def test_check_config_holds_a_kubeconfig_server_to_the_outbound_rule(tmp_path: Path) -> None:
    """An attacker-friendly kubeconfig pointing at plain http elsewhere would send jwtlet's token in clear."""
    config = write_kubeconfig(tmp_path, kubeconfig_document("http://api.example.com", {"token": "t"}))
    [problem] = config_with({"kubeconfig": config})
    assert problem.startswith("k8s.kubeconfig: server http://api.example.com: must be https")
    assert config_with({"kubeconfig": config}, dev=True) == []


def test_check_config_reports_a_client_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    authority = Authority.create("ca")
    _, stray_key = authority.issue("jwtlet")
    certificate, _ = authority.issue("jwtlet")
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://api", {
        "client-certificate-data": b64(certificate), "client-key-data": b64(stray_key)}))
    [problem] = config_with({"kubeconfig": config})
    assert problem == f"k8s.kubeconfig: {config}: client-key: does not belong to client-certificate"


def test_jwtlet_check_config_names_each_broken_kubeconfig_in_one_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command an operator runs: the k8s table's unknown context and the target cluster's missing file."""
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://api", {"token": "t"}))
    missing = str(tmp_path / "target-kubeconfig")
    path = tmp_path / "jwtlet.yaml"
    path.write_text(yaml.safe_dump({
        "issuer": "https://jwtlet.example", "token": {"client_audience": "a", "audience": "b"},
        "storage_backend": {"type": "memory"}, "signer": {"type": "local-key", "generate": True},
        "k8s": {"kubeconfig": config, "context": "staging"},
        "ext_authz": {"target_cluster": {"kubeconfig": missing}},
    }))
    assert cli.main(["check-config", "--config", str(path)]) == 1
    problems = capsys.readouterr().err
    assert f"k8s.context: {config}: no context named 'staging'" in problems
    assert f"ext_authz.target_cluster.kubeconfig: {missing}: cannot read it (FileNotFoundError)" in problems


# -- exec credential plugins ---------------------------------------------------------------

PLUGIN = textwrap.dedent('''\
    import json, os, sys
    runs = sys.argv[1]
    count = int(open(runs).read() or 0) + 1 if os.path.exists(runs) else 1
    open(runs, "w").write(str(count))
    info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
    assert info["spec"]["interactive"] is False
    status = {"token": f"{os.environ['TOKEN_PREFIX']}-{count}"}
    if os.environ.get("EXPIRES"):
        status["expirationTimestamp"] = os.environ["EXPIRES"]
    print(json.dumps({"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}))
''')


@attrs.define
class ExecSetup:
    cluster: FakeKubernetes
    server: LoopbackServer
    clock: Clock
    runs: Path
    kubeconfig: str

    def run_count(self) -> int:
        return int(self.runs.read_text()) if self.runs.exists() else 0


def rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def exec_setup(tmp_path: Path, clock: Clock, api_version: str, expires: Optional[float]) -> ExecSetup:
    # The API server keeps real time; ``clock`` is jwtlet's, which decides when a credential expires.
    fake = FakeKubernetes(caller_tokens={"exec-token-1"})
    server = await serve(reactor, fake.resource())
    fake.url = fake.issuer = server.url
    fake.add_service_account("ns", "app")
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    runs = tmp_path / "runs"
    env = [{"name": "TOKEN_PREFIX", "value": "exec-token"}]
    if expires is not None:
        env.append({"name": "EXPIRES", "value": rfc3339(expires)})
    config = write_kubeconfig(tmp_path, kubeconfig_document(server.url, {"exec": {
        "apiVersion": api_version, "command": sys.executable, "args": [str(script), str(runs)], "env": env,
        "interactiveMode": "Never"}}))
    return ExecSetup(fake, server, clock, runs, config)


def validator_for(setup: ExecSetup | TLSSetup, tmp_path: Path, **options: Any) -> Any:
    """The tokenreview validator reaching ``setup``'s API server by its kubeconfig alone."""
    context = plugin_context(tmp_path, setup.clock, setup.cluster.issuer)
    return kubernetes_tokenreview.build({"kubeconfig": setup.kubeconfig, **options}, context)


def plugin_context(tmp_path: Path, clock: Clock, issuer: str) -> PluginContext:
    """No shared HTTP client and no own token file: whatever reaches the API server came from the kubeconfig."""
    config = attrs.evolve(jwtlet_config("kubernetes-tokenreview"),
                          k8s=K8sConfig(cluster_issuer=issuer, token_file=str(tmp_path / "no-own-token")))
    return PluginContext(reactor=reactor, clock=clock, http_client=None, config=config, data_dir=tmp_path)


@pytest_twisted.async_yield_fixture(params=[V1, V1BETA1])
async def exec_cluster(request: Any, tmp_path: Path, clock: Clock) -> AsyncIterator[ExecSetup]:
    setup = await exec_setup(tmp_path, clock, request.param, expires=clock.seconds() + 600)
    try:
        yield setup
    finally:
        await setup.server.stop()


@pytest_twisted.ensureDeferred
async def test_an_exec_plugin_runs_once_and_its_token_is_kept_until_it_expires(
        exec_cluster: ExecSetup, tmp_path: Path) -> None:
    validator = validator_for(exec_cluster, tmp_path, cache_ttl_secs=0)
    try:
        for _ in range(3):
            identity = await validator.validate(exec_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]),
                                                CLIENT_AUDIENCE)
            assert identity.username == "system:serviceaccount:ns:app"
        assert exec_cluster.run_count() == 1
        # Past expirationTimestamp the plugin runs again, before anything is refused.
        exec_cluster.cluster.caller_tokens.add("exec-token-2")
        exec_cluster.clock.advance(601)
        await validator.validate(exec_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
        assert exec_cluster.run_count() == 2
        assert exec_cluster.cluster.requests["tokenreviews"] == 4  # never a 401 on the way
    finally:
        await close_http_client(validator.api.http_client)


@pytest_twisted.ensureDeferred
async def test_a_revoked_exec_token_makes_the_plugin_run_again_after_the_401(
        exec_cluster: ExecSetup, tmp_path: Path) -> None:
    validator = validator_for(exec_cluster, tmp_path, cache_ttl_secs=0)
    try:
        await validator.validate(exec_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
        exec_cluster.cluster.caller_tokens = {"exec-token-2"}  # the first token was revoked
        await validator.validate(exec_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
        assert exec_cluster.run_count() == 2
        assert exec_cluster.cluster.requests["tokenreviews"] == 3  # the refused one, and its retry
    finally:
        await close_http_client(validator.api.http_client)


@pytest_twisted.ensureDeferred
async def test_callers_arriving_while_the_plugin_runs_share_that_one_run(tmp_path: Path, clock: Clock) -> None:
    setup = await exec_setup(tmp_path, clock, V1, expires=None)
    cluster = kubeconfig.resolve([ClusterAccess(kubeconfig=setup.kubeconfig)], reactor, clock)
    try:
        tokens = await gatherResults([ensureDeferred(cluster.credential.bearer()) for _ in range(5)])
        assert tokens == ["exec-token-1"] * 5
        assert setup.run_count() == 1
        # Without expirationTimestamp, the token is kept until it is refused.
        clock.advance(10 * 86400)
        assert await cluster.credential.bearer() == "exec-token-1"
        assert setup.run_count() == 1
    finally:
        await setup.server.stop()


@pytest_twisted.ensureDeferred
async def test_a_failing_exec_plugin_is_a_dependency_down_that_quotes_nothing_it_wrote(
        tmp_path: Path, clock: Clock) -> None:
    script = tmp_path / "failing.py"
    script.write_text("import sys\nprint('leaked-secret')\nsys.stderr.write('leaked-secret')\nsys.exit(3)\n")
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://api", {"exec": {
        "apiVersion": V1, "command": sys.executable, "args": [str(script)]}}))
    cluster = kubeconfig.resolve([ClusterAccess(kubeconfig=config)], reactor, clock)
    with pytest.raises(DependencyUnavailable) as raised:
        await cluster.credential.bearer()
    assert "exit status 3" in str(raised.value) and "leaked-secret" not in str(raised.value)
    script.write_text("print('leaked-secret')\n")
    with pytest.raises(DependencyUnavailable) as raised:
        await cluster.credential.bearer()
    assert "leaked-secret" not in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_a_hanging_exec_plugin_is_killed_at_its_timeout(tmp_path: Path, clock: Clock) -> None:
    script = tmp_path / "hangs.py"
    script.write_text("import signal\nsignal.pause()\n")  # waits for a signal that only the kill sends
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://api", {"exec": {
        "apiVersion": V1, "command": sys.executable, "args": [str(script)]}}))
    cluster = kubeconfig.resolve([ClusterAccess(kubeconfig=config)], reactor, clock)
    pending = ensureDeferred(cluster.credential.bearer())
    clock.advance(TIMEOUT_SECS)
    with pytest.raises(DependencyUnavailable, match="timed out"):
        await pending


@pytest_twisted.ensureDeferred
async def test_a_plugin_whose_child_holds_its_stdout_is_still_done_at_the_timeout(
        tmp_path: Path, clock: Clock) -> None:
    """A plugin that leaves a process holding its output open must not hold every TokenReview after the kill."""
    script = tmp_path / "forks.py"
    # The child keeps the plugin's stdout, and lives until its stdin (the plugin's) closes.
    script.write_text(textwrap.dedent("""
        import signal, subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"])
        signal.pause()
    """))
    config = write_kubeconfig(tmp_path, kubeconfig_document("https://api", {"exec": {
        "apiVersion": V1, "command": sys.executable, "args": [str(script)]}}))
    cluster = kubeconfig.resolve([ClusterAccess(kubeconfig=config)], reactor, clock)
    pending = ensureDeferred(cluster.credential.bearer())
    clock.advance(TIMEOUT_SECS)
    # Bounded on the real reactor: before the fix this waited for the child, that is forever.
    pending.addTimeout(10, reactor)
    with pytest.raises(DependencyUnavailable, match="timed out"):
        await pending


def test_the_outbound_client_imports_first_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """No import cycle: each of these modules is importable on its own."""
    for module in ("jwtlet.outbound", "jwtlet.kubernetes.credentials", "jwtlet.kubernetes.apiserver"):
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr


# -- client certificates over TLS -----------------------------------------------------------


def b64(pem: bytes) -> str:
    return base64.b64encode(pem).decode()


@attrs.frozen
class Authority:
    """A throwaway CA that issues certificates for the test."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            cls._builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(hours=1)))

    def issue(self, name: str, ip: Optional[str] = None) -> tuple[bytes, bytes]:
        """A certificate (PEM) for ``name`` (and the IP address ``ip``) and its key (PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
                                self.certificate.subject, key.public_key())
        if ip is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return (certificate.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@attrs.define
class TLSSetup:
    cluster: FakeKubernetes
    server: LoopbackServer
    clock: Clock
    server_ca: Authority
    client_ca: Authority
    kubeconfig: str = ""

    def write(self, directory: Path, user: dict[str, Any]) -> None:
        self.kubeconfig = write_kubeconfig(directory, kubeconfig_document(
            self.server.url, user, {"certificate-authority-data": b64(self.server_ca.pem)}))


@pytest_twisted.async_yield_fixture
async def tls_cluster(tmp_path: Path, clock: Clock) -> AsyncIterator[TLSSetup]:
    server_ca, client_ca = Authority.create("cluster-ca"), Authority.create("client-ca")
    certificate, key = server_ca.issue("kube-apiserver", ip="127.0.0.1")
    fake = FakeKubernetes(caller_tokens=set(), caller_certificates={"jwtlet"})
    server = await serve_tls(reactor, fake.resource(), ssl.PrivateCertificate.loadPEM((certificate + key).decode()),
                             ssl.Certificate.loadPEM(client_ca.pem))
    fake.url = fake.issuer = server.url
    fake.add_service_account("ns", "app")
    try:
        yield TLSSetup(fake, server, clock, server_ca, client_ca)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_kubeconfig_reviews_tokens_over_tls(tls_cluster: TLSSetup, tmp_path: Path) -> None:
    certificate, key = tls_cluster.client_ca.issue("jwtlet")
    (tmp_path / "client.crt").write_bytes(certificate)  # a file, relative to the kubeconfig
    tls_cluster.write(tmp_path, {"client-certificate": "client.crt", "client-key-data": b64(key)})
    validator = validator_for(tls_cluster, tmp_path)
    try:
        identity = await validator.validate(tls_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
        assert identity.username == "system:serviceaccount:ns:app"
        await validator.check_ready()
    finally:
        await close_http_client(validator.api.http_client)


@pytest_twisted.ensureDeferred
async def test_a_certificate_the_api_server_does_not_know_is_refused(tls_cluster: TLSSetup, tmp_path: Path) -> None:
    """The TLS layer accepts any certificate of the client CA; the API server then knows only ``jwtlet``."""
    certificate, key = tls_cluster.client_ca.issue("somebody-else")
    tls_cluster.write(tmp_path, {"client-certificate-data": b64(certificate), "client-key-data": b64(key)})
    validator = validator_for(tls_cluster, tmp_path)
    try:
        with pytest.raises(DependencyUnavailable, match="HTTP 401"):
            await validator.validate(tls_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
    finally:
        await close_http_client(validator.api.http_client)


@pytest_twisted.ensureDeferred
async def test_without_a_client_certificate_the_handshake_fails(tls_cluster: TLSSetup, tmp_path: Path) -> None:
    tls_cluster.write(tmp_path, {"token": "jwtlet-own-token"})
    validator = validator_for(tls_cluster, tmp_path)
    try:
        with pytest.raises(DependencyUnavailable):
            await validator.validate(tls_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
        assert tls_cluster.cluster.requests["tokenreviews"] == 0
    finally:
        await close_http_client(validator.api.http_client)


@pytest_twisted.ensureDeferred
async def test_a_server_certificate_from_another_ca_is_not_trusted(tls_cluster: TLSSetup, tmp_path: Path) -> None:
    """A man in the middle with a certificate of another CA never sees jwtlet's credential."""
    certificate, key = tls_cluster.client_ca.issue("jwtlet")
    tls_cluster.write(tmp_path, {"client-certificate-data": b64(certificate), "client-key-data": b64(key)})
    document = yaml.safe_load(Path(tls_cluster.kubeconfig).read_text())
    document["clusters"][0]["cluster"]["certificate-authority-data"] = b64(Authority.create("other").pem)
    Path(tls_cluster.kubeconfig).write_text(yaml.safe_dump(document))
    validator = validator_for(tls_cluster, tmp_path)
    try:
        with pytest.raises(DependencyUnavailable):
            await validator.validate(tls_cluster.cluster.mint("ns", "app", [CLIENT_AUDIENCE]), CLIENT_AUDIENCE)
        assert tls_cluster.cluster.requests["tokenreviews"] == 0
    finally:
        await close_http_client(validator.api.http_client)


def test_a_validator_kubeconfig_problem_is_a_plugin_config_error(tmp_path: Path, clock: Clock) -> None:
    context = plugin_context(tmp_path, clock, "https://issuer")
    with pytest.raises(PluginConfigError) as raised:
        kubernetes_tokenreview.build({"kubeconfig": str(tmp_path / "absent")}, context)
    assert raised.value.messages == (f"kubeconfig: {tmp_path / 'absent'}: cannot read it (FileNotFoundError)",)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - Twisted's name
        return b"hello"


async def serve_https(authority: Authority) -> LoopbackServer:
    certificate, key = authority.issue("127.0.0.1", ip="127.0.0.1")
    options = ssl.PrivateCertificate.loadPEM((certificate + key).decode()).options()
    port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(Site(Hello()))
    return LoopbackServer(port=port, url=f"https://127.0.0.1:{port.getHost().port}")


@pytest_twisted.ensureDeferred
async def test_an_extra_ca_is_trusted_besides_the_platforms_not_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's client trusts the cluster's CA and still reaches a public issuer (GitHub's, a cloud's)."""
    cluster_ca, public_ca = Authority.create("cluster-ca"), Authority.create("public-ca")
    (tmp_path / "cluster-ca.crt").write_bytes(cluster_ca.pem)
    (tmp_path / "platform.pem").write_bytes(public_ca.pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "platform.pem"))  # OpenSSL's platform store, here
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    cluster, public = await serve_https(cluster_ca), await serve_https(public_ca)
    client = build_http_client(reactor, ca_file=str(tmp_path / "cluster-ca.crt"))
    try:
        for server in (cluster, public):
            response = await client.get(server.url)
            assert await response.content() == b"hello"
        stranger = await serve_https(Authority.create("stranger-ca"))
        try:
            with pytest.raises(Exception):  # noqa: B017 - any TLS failure: the handshake is refused
                await client.get(stranger.url)
        finally:
            await stranger.port.stopListening()
    finally:
        await close_http_client(client)
        await cluster.port.stopListening()
        await public.port.stopListening()
