"""
Reaching an API server by a kubeconfig file, as Tokensmith's
``--workload-kubeconfig`` and the EKS and GKE kubeconfigs do: one context's
server and CA (file or data), and its user's credential (a bearer token
inline or in a file, a client certificate and key, or an ``exec`` credential
plugin, ``client.authentication.k8s.io/v1`` or ``v1beta1``).

:func:`parse` reads a kubeconfig document (pure); :func:`resolve` layers a
config table's explicit keys over its kubeconfig over the next table (the
``k8s`` table, then in-cluster), reads the files named, and answers the
server, the :class:`Credential` to present and the TLS policy.
The credentials themselves (token files, inline tokens, exec plugins) are
:mod:`jwtlet.kubernetes.credentials`.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, TypeVar

import attrs
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorProcess, IReactorTime
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from jwtlet.config.reader import SectionReader, as_nonempty_str, https_url
from jwtlet.config.schema import IN_CLUSTER_CA_FILE, IN_CLUSTER_TOKEN_FILE, ClusterAccess
from jwtlet.kubernetes.credentials import (
    Credential,
    ExecPlugin,
    ExecSpec,
    FileToken,
    InlineToken,
    NoToken,
    string_field,
)
from jwtlet.outbound import OutboundHTTPClient, TokenFile, build_http_client, tls_policy

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # typed there only; ssl exports its factories

T = TypeVar("T")

#: The in-cluster layer (client-go's ``InClusterConfig``): the pod's own token and CA, no server.
IN_CLUSTER = ClusterAccess(token_file=IN_CLUSTER_TOKEN_FILE, ca_file=IN_CLUSTER_CA_FILE)

#: Ways a kubeconfig user may authenticate that jwtlet refuses, and what to use instead.
_REFUSED_USER_KEYS = {
    "username": "basic authentication was removed from Kubernetes; use a token, a client certificate or exec",
    "password": "basic authentication was removed from Kubernetes; use a token, a client certificate or exec",
    "auth-provider": "auth-provider plugins were removed from client-go; use the provider's exec plugin "
                     "(gke-gcloud-auth-plugin, kubelogin)",
}


class KubeconfigError(ValueError):
    """A kubeconfig that cannot be used: unreadable, no such context, a part missing or refused."""

    #: The layer of :func:`resolve` whose kubeconfig it is (``None`` elsewhere).
    layer: Optional[ClusterAccess] = None


class UnknownContext(KubeconfigError):
    """The context asked for (or ``current-context``) is not in the file."""


# -- parsing: pure ------------------------------------------------------------------


@attrs.frozen
class Material:
    """PEM bytes given inline (``…-data``, base64) or by a file (relative to the kubeconfig)."""

    data: Optional[bytes] = attrs.field(default=None, repr=False)
    path: Optional[Path] = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@attrs.frozen
class Entry:
    """One context of a kubeconfig: its cluster and its user, files not read yet."""

    server: str
    certificate_authority: Optional[Material] = None
    tls_server_name: Optional[str] = None
    token: Optional[str] = attrs.field(default=None, repr=False)
    token_file: Optional[Path] = None
    client_certificate: Optional[Material] = None
    client_key: Optional[Material] = None
    exec: Optional[ExecSpec] = None

    @property
    def authenticates(self) -> bool:
        """Whether the user presents anything at all (else the next layer's credential is used)."""
        return any(value is not None for value in (self.token, self.token_file, self.client_certificate, self.exec))


def _named(document: Mapping[str, object], kind: str, name: str) -> Mapping[str, object]:
    """The ``cluster``/``user``/``context`` body of the entry called ``name`` in the list ``kind``."""
    entries = document.get(f"{kind}s") or []
    if not isinstance(entries, list):
        raise KubeconfigError(f"{kind}s: must be a list")
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            body = entry.get(kind) or {}
            if not isinstance(body, Mapping):
                raise KubeconfigError(f"{kind} {name!r}: must be a mapping")
            return body
    raise KubeconfigError(f"no {kind} named {name!r}")


def _material(body: Mapping[str, object], key: str, where: str, base: Path) -> Optional[Material]:
    """``key-data`` (base64 of PEM) wins over ``key`` (a path), as in client-go."""
    data = string_field(body, f"{key}-data", where)
    if data is not None:
        try:
            return Material(data=base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise KubeconfigError(f"{where}.{key}-data: not base64") from None
    path = string_field(body, key, where)
    return Material(path=base / path) if path is not None else None


def parse(document: object, context: Optional[str], base: Path) -> Entry:
    """
    The ``context`` (default ``current-context``) of a kubeconfig document;
    relative paths are taken from ``base``, the kubeconfig's directory.
    Raises :class:`KubeconfigError` naming what is wrong.
    """
    try:
        return _parse(document, context, base)
    except KubeconfigError:
        raise
    except ValueError as error:  # a member of the wrong type, an exec section out of shape
        raise KubeconfigError(str(error)) from None


def _parse(document: object, context: Optional[str], base: Path) -> Entry:
    if not isinstance(document, Mapping):
        raise KubeconfigError("not a kubeconfig (a mapping with clusters, users and contexts)")
    chosen = context or string_field(document, "current-context", "kubeconfig")
    if chosen is None:
        raise KubeconfigError("no context given and no current-context")
    try:
        selected = _named(document, "context", chosen)
    except KubeconfigError as error:
        raise UnknownContext(str(error)) from None
    cluster_name = string_field(selected, "cluster", f"context {chosen!r}")
    if cluster_name is None:
        raise KubeconfigError(f"context {chosen!r}: names no cluster")
    cluster = _named(document, "cluster", cluster_name)
    where = f"cluster {cluster_name!r}"
    server = string_field(cluster, "server", where)
    if server is None:
        raise KubeconfigError(f"{where}: no server")
    if cluster.get("insecure-skip-tls-verify") is True:
        # The token would go to whoever answers: security.md's outbound rule.
        raise KubeconfigError(f"{where}.insecure-skip-tls-verify: refused; give certificate-authority(-data)")
    user_name = string_field(selected, "user", f"context {chosen!r}")
    user: Mapping[str, object] = _named(document, "user", user_name) if user_name is not None else {}
    who = f"user {user_name!r}"
    for key, instead in _REFUSED_USER_KEYS.items():
        if user.get(key) is not None:
            raise KubeconfigError(f"{who}.{key}: {instead}")
    token_file = string_field(user, "tokenFile", who)
    entry = Entry(
        server=server.rstrip("/"),
        certificate_authority=_material(cluster, "certificate-authority", where, base),
        tls_server_name=string_field(cluster, "tls-server-name", where),
        token=string_field(user, "token", who),
        token_file=base / token_file if token_file is not None else None,
        client_certificate=_material(user, "client-certificate", who, base),
        client_key=_material(user, "client-key", who, base),
        exec=ExecSpec.parse(user["exec"], f"{who}.exec", base) if user.get("exec") is not None else None,
    )
    if (entry.client_certificate is None) != (entry.client_key is None):
        raise KubeconfigError(f"{who}: client-certificate and client-key go together")
    return entry


def load(path: str, context: Optional[str]) -> Entry:
    """The kubeconfig at ``path``, read and parsed; :class:`KubeconfigError` says what is wrong."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise KubeconfigError(f"cannot read it ({error.__class__.__name__})") from None
    except yaml.YAMLError:
        raise KubeconfigError("not YAML") from None
    return parse(document, context, Path(path).parent)


def check(path: str, context: Optional[str]) -> Entry:
    """:func:`load`, and the certificates it names read and checked: what ``check-config`` needs."""
    entry = load(path, context)
    _tls_material(entry)
    return entry


def read_keys(section: SectionReader, dev: bool) -> tuple[Optional[str], Optional[str]]:
    """
    ``kubeconfig`` and ``context`` of a table: the file must be readable,
    the context must exist, and its server must follow the outbound URL rule
    (``check-config`` says which is wrong).
    """
    path: Optional[str] = section.get("kubeconfig", as_nonempty_str, None)
    context: Optional[str] = section.get("context", as_nonempty_str, None)
    if path is None:
        if context is not None:
            section.problem("context", "needs kubeconfig")
        return None, context
    try:
        server = check(path, context).server
    except UnknownContext as error:
        section.problem("context" if context is not None else "kubeconfig", f"{path}: {error}")
    except KubeconfigError as error:
        section.problem("kubeconfig", f"{path}: {error}")
    else:
        unsafe = https_url(dev)(server)
        if unsafe:
            section.problem("kubeconfig", f"server {server}: {unsafe}")
    return path, context


# -- TLS ------------------------------------------------------------------------------


def _certificates(pem: bytes, what: str) -> list[ssl.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise KubeconfigError(f"{what}: no PEM certificate") from None
    return [ssl.Certificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM)) for cert in found]


def client_certificate(certificate_pem: bytes, key_pem: bytes) -> ssl.PrivateCertificate:
    """The client certificate and its key, checked to belong together before anything connects."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise KubeconfigError("client-certificate/client-key: not an unencrypted PEM certificate and key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (certificate.public_key().public_bytes(serialization.Encoding.DER, public)
            != key.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise KubeconfigError("client-key: does not belong to client-certificate")
    return ssl.PrivateCertificate.loadPEM(
        certificate.public_bytes(serialization.Encoding.PEM).decode()
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode())


@implementer(IPolicyForHTTPS)
@attrs.frozen
class ClusterTLS:
    """
    TLS to one API server: its CA only when one is given (as client-go: the
    platform's otherwise), the client certificate when the user has one, and
    ``tls-server-name`` in place of the URL's host when set.
    """

    authorities: Optional[tuple[ssl.Certificate, ...]] = None
    client: Optional[ssl.PrivateCertificate] = attrs.field(default=None, repr=False)
    server_name: Optional[str] = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:  # noqa: N802
        trust: IOpenSSLTrustRoot = (
            ssl.trustRootFromCertificates(list(self.authorities)) if self.authorities else ssl.platformTrust())
        return ssl.optionsForClientTLS(self.server_name or hostname.decode("ascii"), trustRoot=trust,
                                       clientCertificate=self.client)


def http_client(reactor: IReactorTime, policy: IPolicyForHTTPS) -> OutboundHTTPClient:
    """
    A client of :func:`jwtlet.outbound.build_http_client`'s kind (its pool,
    its redirect rule) whose TLS is ``policy``.
    """
    pooled = build_http_client(reactor)
    return OutboundHTTPClient(Agent(reactor, contextFactory=policy, connectTimeout=5.0, pool=pooled.pool),
                              pooled.pool)


# -- resolving: explicit keys, then the kubeconfig, then the next layer ---------------


@attrs.frozen
class Cluster:
    """
    How to reach one API server.  ``from_kubeconfig``: a kubeconfig took
    part, so its TLS settings (CA, client certificate) must be used rather
    than the daemon's shared HTTP client.
    """

    url: Optional[str]
    credential: Credential
    tls: IPolicyForHTTPS
    from_kubeconfig: bool


@attrs.frozen
class _Parts:
    """What the layers have said so far: the first to say a setting wins."""

    url: Optional[str] = None
    credential: Optional[Credential] = None
    ca: Optional[Material] = None
    client: Optional[ssl.PrivateCertificate] = attrs.field(default=None, repr=False)
    server_name: Optional[str] = None
    from_kubeconfig: bool = False

    def fill(self, found: _Parts) -> _Parts:
        """What ``found`` says of the settings not said yet."""
        return _Parts(
            url=_first(self.url, found.url),
            credential=_first(self.credential, found.credential),
            ca=_first(self.ca, found.ca),
            client=_first(self.client, found.client),
            server_name=_first(self.server_name, found.server_name),
            from_kubeconfig=self.from_kubeconfig or found.from_kubeconfig,
        )


def _first(said: Optional[T], found: Optional[T]) -> Optional[T]:
    return said if said is not None else found


def _user_credential(entry: Entry, processes: IReactorProcess, clock: IReactorTime) -> Optional[Credential]:
    if entry.token is not None:
        return InlineToken(entry.token)
    if entry.token_file is not None:
        return FileToken(TokenFile(entry.token_file))
    if entry.exec is not None:
        return ExecPlugin(entry.exec, processes, clock)
    return NoToken() if entry.client_certificate is not None else None


def _tls_material(entry: Entry) -> tuple[Optional[bytes], Optional[ssl.PrivateCertificate]]:
    """The CA and client certificate a kubeconfig names, read now: they must be there (as in client-go)."""
    try:
        ca = entry.certificate_authority.read() if entry.certificate_authority is not None else None
        client = (client_certificate(entry.client_certificate.read(), entry.client_key.read())
                  if entry.client_certificate is not None and entry.client_key is not None else None)
    except OSError as error:
        raise KubeconfigError(f"cannot read a file it names ({error.__class__.__name__})") from None
    if ca is not None:
        _certificates(ca, "certificate-authority")
    return ca, client


def _kubeconfig_parts(parts: _Parts, entry: Entry, processes: IReactorProcess, clock: IReactorTime) -> _Parts:
    ca, client = _tls_material(entry)
    return parts.fill(_Parts(url=entry.server, credential=_user_credential(entry, processes, clock),
                             ca=Material(data=ca) if ca is not None else None, client=client,
                             server_name=entry.tls_server_name, from_kubeconfig=True))


def resolve(layers: Sequence[ClusterAccess], processes: IReactorProcess, clock: IReactorTime) -> Cluster:
    """
    Each setting from the first layer that gives it, where a layer's
    explicit keys come before its kubeconfig: explicit keys, then the
    kubeconfig, then the next layer (the ``k8s`` table, in-cluster).
    Reads the kubeconfigs and the certificates they name; raises
    :class:`KubeconfigError`.
    """
    parts = _Parts()
    for layer in layers:
        token = FileToken(TokenFile(layer.token_file)) if layer.token_file is not None else None
        ca_file = Material(path=Path(layer.ca_file)) if layer.ca_file is not None else None
        parts = parts.fill(_Parts(url=layer.api_server_url, credential=token, ca=ca_file))
        if layer.kubeconfig is not None:
            try:
                parts = _kubeconfig_parts(parts, load(layer.kubeconfig, layer.context), processes, clock)
            except KubeconfigError as error:
                failed = KubeconfigError(f"{layer.kubeconfig}: {error}")
                failed.layer = layer
                raise failed from None
    credential = parts.credential or NoToken()
    ca = parts.ca
    if not parts.from_kubeconfig:
        # No kubeconfig in any layer: TLS as before kubeconfigs existed.
        return Cluster(parts.url, credential, tls_policy(str(ca.path) if ca is not None else None), False)
    # A CA file from a config key is used when it exists (the in-cluster ca.crt is absent outside a pod).
    if ca is not None and ca.path is not None and not ca.path.is_file():
        ca = None
    authorities = tuple(_certificates(ca.read(), "certificate-authority")) if ca is not None else None
    return Cluster(parts.url, credential, ClusterTLS(authorities, parts.client, parts.server_name), True)
