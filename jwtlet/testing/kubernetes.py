"""
A fake Kubernetes API server, faithful to the wire facts jwtlet relies on:
OIDC discovery and JWKS (authenticated by default), TokenReview and
TokenRequest (201 on success, a failed review is still 201 with
``status.error``), ``Status`` bodies on 401/403/404/422, projected
service-account tokens with ``aud`` as an array and a Kubernetes-style
``kid`` (base64url SHA-256 of the PKIX DER public key), key rotation.

Serve :meth:`FakeKubernetes.resource` in memory with
:class:`jwtlet.testing.memory.MemoryNetwork` (unit tests), over real HTTP
with :func:`jwtlet.testing.loopback.serve` (end-to-end tests), or over TLS
that requires a client certificate with :func:`serve_tls` (kubeconfig
client-certificate users: the API server takes the certificate's common
name as the caller, as its x509 authenticator does).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections import Counter
from typing import Any, ClassVar, Optional

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from jwcrypto.common import JWException, json_encode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS
from klein import Klein
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import ISSLTransport
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

from jwtlet.testing.loopback import LoopbackServer

API_AUDIENCE = "https://kubernetes.default.svc"
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def kubernetes_kid(key: JWK) -> str:
    """``kid`` as the API server computes it: base64url(SHA-256(PKIX DER of the public key))."""
    public = key._get_public_key()  # jwcrypto exposes no public accessor for the key object
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def status_body(code: int, reason: str, message: str, details: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


def peer_common_name(request: IRequest) -> Optional[str]:
    """The common name of the client certificate the request came with over TLS, if any."""
    transport = getattr(request, "transport", None)
    # In memory (MemoryNetwork) there is no TLS and no certificate, whatever the transport claims.
    certificate_of = getattr(transport, "getPeerCertificate", None) if ISSLTransport.providedBy(transport) else None
    peer = certificate_of() if certificate_of is not None else None
    if peer is None:
        return None
    names = peer.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


async def serve_tls(
    reactor: Any, resource: IResource, certificate: ssl.PrivateCertificate, client_ca: ssl.Certificate
) -> LoopbackServer:
    """
    Serve ``resource`` over TLS on a free loopback port with ``certificate``,
    requiring a client certificate signed by ``client_ca``: a connection
    without one fails in the handshake.
    """
    site = Site(resource)
    site.displayTracebacks = False
    options = certificate.options(client_ca)  # verify and require the peer's certificate
    port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(site)
    return LoopbackServer(port=port, url=f"https://127.0.0.1:{port.getHost().port}")


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@attrs.define
class SigningKey:
    key: JWK
    algorithm: str
    kid: str

    @classmethod
    def generate(cls, algorithm: str = "RS256") -> SigningKey:
        key = JWK.generate(kty="RSA", size=2048) if algorithm == "RS256" else JWK.generate(kty="EC", crv="P-256")
        return cls(key, algorithm, kubernetes_kid(key))

    def public(self) -> dict[str, Any]:
        public = json.loads(self.key.export_public())
        public.update(use="sig", kid=self.kid, alg=self.algorithm)
        return public


@attrs.define
class FakeKubernetes:
    """The API server's state and its HTTP face (``app``)."""

    app: ClassVar[Klein] = Klein()

    issuer: str = DEFAULT_ISSUER
    api_audiences: tuple[str, ...] = (API_AUDIENCE,)
    clock: Any = None
    #: bearer tokens the API server accepts from callers (jwtlet's own SA token)
    caller_tokens: set[str] = attrs.field(factory=lambda: {"jwtlet-own-token"})
    #: common names of client certificates accepted as callers (over :func:`serve_tls`)
    caller_certificates: set[str] = attrs.field(factory=set)
    discovery_requires_auth: bool = True
    #: when set, every request is answered with this status and a Status body
    failure_status: Optional[int] = None
    #: where the JWKS is served from (set by the test once it knows the URL)
    url: str = "https://kubernetes.invalid"
    keys: list[SigningKey] = attrs.field(factory=lambda: [SigningKey.generate()])
    accounts: dict[tuple[str, str], str] = attrs.field(factory=dict)
    #: tokens of users who are not service accounts (people, other authenticators): token -> user
    users: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    requests: Counter[str] = attrs.field(factory=Counter)

    # -- state -------------------------------------------------------------------

    def now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def add_service_account(self, namespace: str, name: str) -> str:
        uid = str(uuid.uuid4())
        self.accounts[(namespace, name)] = uid
        return uid

    def delete_service_account(self, namespace: str, name: str) -> None:
        self.accounts.pop((namespace, name), None)

    def rotate_key(self, algorithm: str = "RS256", keep_old: bool = True) -> SigningKey:
        """A new signing key at the front; the old ones stay published unless told otherwise."""
        new = SigningKey.generate(algorithm)
        self.keys = [new] + (self.keys if keep_old else [])
        return new

    def sign(self, claims: dict[str, Any], key: Optional[SigningKey] = None,
             header: Optional[dict[str, Any]] = None) -> str:
        key = key or self.keys[0]
        protected = header if header is not None else {"alg": key.algorithm, "kid": key.kid}
        jws = JWS(json_encode(claims).encode())
        jws.add_signature(key.key, alg=protected.get("alg", key.algorithm), protected=json_encode(protected))
        return str(jws.serialize(compact=True))

    def projected_claims(
        self, namespace: str, name: str, audiences: Optional[list[str]] = None, ttl: int = 3600,
        issued_at: Optional[float] = None, pod: Optional[str] = None, jti: bool = True,
    ) -> dict[str, Any]:
        now = int(self.now() if issued_at is None else issued_at)
        uid = self.accounts.get((namespace, name)) or str(uuid.uuid4())
        nested: dict[str, Any] = {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}}
        if pod is not None:
            nested["pod"] = {"name": pod, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, pod))}
        claims: dict[str, Any] = {
            "aud": list(audiences or self.api_audiences),
            "exp": now + ttl,
            "iat": now,
            "iss": self.issuer,
            "kubernetes.io": nested,
            "nbf": now,
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        if jti:
            claims["jti"] = str(uuid.uuid4())
        return claims

    def mint(self, namespace: str, name: str, audiences: Optional[list[str]] = None, ttl: int = 3600,
             **options: Any) -> str:
        """A projected service-account token, as the kubelet would mount it."""
        return self.sign(self.projected_claims(namespace, name, audiences, ttl, **options))

    def mint_legacy(self, namespace: str, name: str) -> str:
        """A legacy secret-based token: flat claims, no ``exp`` and no ``aud``."""
        prefix = "kubernetes.io/serviceaccount/"
        return self.sign({
            "iss": "kubernetes/serviceaccount",
            f"{prefix}namespace": namespace,
            f"{prefix}secret.name": f"{name}-token-abcde",
            f"{prefix}service-account.name": name,
            f"{prefix}service-account.uid": self.accounts.get((namespace, name), str(uuid.uuid4())),
            "sub": f"system:serviceaccount:{namespace}:{name}",
        })

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public() for key in self.keys]}

    # -- token checks, as the API server's authenticator does them ------------------

    def review(self, token: str, audiences: Optional[list[str]]) -> dict[str, Any]:
        """The ``status`` of a TokenReview."""
        wanted = list(audiences) if audiences else list(self.api_audiences)
        if token in self.users:
            return {"authenticated": True, "user": self.users[token], "audiences": wanted}
        try:
            jws = JWS()
            jws.deserialize(token)
            header = jws.jose_header
            key = next(k for k in self.keys if k.kid == header.get("kid"))
            jws.verify(key.key, alg=key.algorithm)
            claims = json.loads(jws.payload)
        except (JWException, ValueError, StopIteration, KeyError, TypeError):
            return {"error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
                    "user": {}}
        if claims.get("iss") == "kubernetes/serviceaccount":
            return self._legacy_review(claims, wanted)
        token_audiences = claims.get("aud") if isinstance(claims.get("aud"), list) else [claims.get("aud")]
        granted = [audience for audience in wanted if audience in token_audiences]
        if claims.get("iss") != self.issuer or not granted:
            return {"error": f"[invalid bearer token, token audiences {json.dumps(token_audiences)} is invalid "
                             f"for the target audiences {json.dumps(wanted)}]", "user": {}}
        now = self.now()
        if now > claims.get("exp", 0):
            return {"error": "[invalid bearer token, service account token has expired]", "user": {}}
        if now < claims.get("nbf", 0):
            return {"error": "[invalid bearer token, service account token is not valid yet]", "user": {}}
        nested = claims.get("kubernetes.io", {})
        namespace = str(nested.get("namespace"))
        name = str(nested.get("serviceaccount", {}).get("name"))
        uid = nested.get("serviceaccount", {}).get("uid")
        if self.accounts.get((namespace, name)) != uid:
            return {"error": "[invalid bearer token, service account token has been invalidated]", "user": {}}
        extra: dict[str, list[str]] = {}
        if "pod" in nested:
            extra["authentication.kubernetes.io/pod-name"] = [nested["pod"]["name"]]
            extra["authentication.kubernetes.io/pod-uid"] = [nested["pod"]["uid"]]
        if "jti" in claims:
            extra["authentication.kubernetes.io/credential-id"] = [f"JTI={claims['jti']}"]
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{name}",
                "uid": uid,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                "extra": extra,
            },
            "audiences": granted,
        }

    def _legacy_review(self, claims: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
        prefix = "kubernetes.io/serviceaccount/"
        namespace = str(claims.get(f"{prefix}namespace"))
        name = str(claims.get(f"{prefix}service-account.name"))
        if self.accounts.get((namespace, name)) != claims.get(f"{prefix}service-account.uid"):
            return {"error": "[invalid bearer token, service account token has been invalidated]", "user": {}}
        # Legacy tokens carry no audience: they are good for the API server's own only.
        granted = [audience for audience in wanted if audience in self.api_audiences]
        if not granted:
            return {"error": f"[invalid bearer token, token audiences {json.dumps(list(self.api_audiences))} is "
                             f"invalid for the target audiences {json.dumps(wanted)}]", "user": {}}
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{name}",
                "uid": self.accounts[(namespace, name)],
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            },
            "audiences": granted,
        }

    # -- HTTP --------------------------------------------------------------------

    def resource(self) -> IResource:
        """The API server's HTTP face, to serve in memory or on loopback."""
        return self.app.resource()

    def _reply(self, request: IRequest, code: int, body: Any, content_type: str = "application/json",
               cache: bool = False) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", content_type.encode())
        if cache:
            request.setHeader(b"Cache-Control", b"public, max-age=3600")
        return json.dumps(body).encode()

    def _refuse(self, request: IRequest, endpoint: str, authenticate: bool = True) -> Optional[bytes]:
        """The answer for a request that must not be served, or ``None``."""
        self.requests[endpoint] += 1
        if self.failure_status is not None:
            reason = {500: "InternalError", 503: "ServiceUnavailable", 429: "TooManyRequests"}.get(
                self.failure_status, "InternalError")
            return self._reply(request, self.failure_status, status_body(self.failure_status, reason, reason))
        if authenticate and not self._authenticated(request):
            return self._reply(request, 401, status_body(401, "Unauthorized", "Unauthorized"))
        return None

    def _authenticated(self, request: IRequest) -> bool:
        """A bearer token it knows, else a client certificate (the TLS layer checked its CA) it knows."""
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token in self.caller_tokens:
            return True
        return bool(self.caller_certificates) and peer_common_name(request) in self.caller_certificates

    @app.route("/.well-known/openid-configuration", methods=["GET"])
    def discovery(self, request: IRequest) -> bytes:
        refused = self._refuse(request, "discovery", self.discovery_requires_auth)
        if refused is not None:
            return refused
        algorithms = sorted({key.algorithm for key in self.keys})
        return self._reply(request, 200, {
            "issuer": self.issuer,
            "jwks_uri": f"{self.url}/openid/v1/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algorithms,
        }, cache=True)

    @app.route("/openid/v1/jwks", methods=["GET"])
    def jwks_document(self, request: IRequest) -> bytes:
        refused = self._refuse(request, "jwks", self.discovery_requires_auth)
        if refused is not None:
            return refused
        return self._reply(request, 200, self.jwks(), "application/jwk-set+json", cache=True)

    @app.route("/apis/authentication.k8s.io/v1/tokenreviews", methods=["POST"])
    def token_review(self, request: IRequest) -> bytes:
        refused = self._refuse(request, "tokenreviews")
        if refused is not None:
            return refused
        try:
            body = json.loads(request.content.read())
            spec = body["spec"]
            token = spec["token"]
        except (ValueError, KeyError, TypeError):
            return self._reply(request, 400, status_body(400, "BadRequest", "the request body is invalid"))
        audiences = spec.get("audiences")
        return self._reply(request, 201, {
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": self.review(token, audiences),
        })

    @app.route("/api/v1/namespaces/<namespace>/serviceaccounts/<name>/token", methods=["POST"])
    def token_request(self, request: IRequest, namespace: str, name: str) -> bytes:
        refused = self._refuse(request, "tokenrequests")
        if refused is not None:
            return refused
        try:
            body = json.loads(request.content.read() or b"{}")
            spec = body.get("spec", {})
        except (ValueError, AttributeError):
            return self._reply(request, 400, status_body(400, "BadRequest", "the request body is invalid"))
        if (namespace, name) not in self.accounts:
            return self._reply(request, 404, status_body(
                404, "NotFound", f'serviceaccounts "{name}" not found', {"name": name, "kind": "serviceaccounts"}))
        expiration = spec.get("expirationSeconds", 3600)
        if not isinstance(expiration, int) or expiration < 600:
            return self._reply(request, 422, status_body(
                422, "Invalid",
                f'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: '
                f"{expiration}: may not specify a duration less than 10 minutes",
            ))
        audiences = spec.get("audiences") or list(self.api_audiences)
        claims = self.projected_claims(namespace, name, audiences, expiration)
        return self._reply(request, 201, {
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
            "spec": dict(spec, audiences=audiences, expirationSeconds=expiration),
            "status": {"token": self.sign(claims), "expirationTimestamp": _rfc3339(claims["exp"])},
        })
