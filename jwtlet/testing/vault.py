"""
A fake HashiCorp Vault: the transit engine's key, sign and verify endpoints,
Kubernetes auth login, token lookup and renewal, and ``sys/health``, answering
with Vault's envelopes, status codes and error strings, quirks included:
RSA-PSS signs with the *maximum* salt length unless ``salt_length`` says
otherwise, ECDSA signatures are ASN.1 unless ``marshaling_algorithm=jws``,
``vault:vN:`` prefixes, reading a missing key is 404 with an empty
``errors`` list while signing with one is 400 ``signing key not found``,
booleans and integers may arrive as strings, a ``batch_input`` sign is 200
however many of its items failed (each failure an ``error`` in its result).

    python -m jwtlet.testing.vault --port 8200 --token root

Over 400 lines because it is one faithful fake of a wire contract (every
endpoint the signer uses, with Vault's quirks and the fault injections the
tests need); it is test code, shipped with the ``test`` extra's users in mind.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import time
import uuid
from collections import Counter
from typing import Any, Callable, ClassVar, Optional

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest

HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha2-224": hashes.SHA224, "sha2-256": hashes.SHA256, "sha2-384": hashes.SHA384, "sha2-512": hashes.SHA512,
    "sha3-224": hashes.SHA3_224, "sha3-256": hashes.SHA3_256, "sha3-384": hashes.SHA3_384,
    "sha3-512": hashes.SHA3_512, "sha1": hashes.SHA1,
}
KEY_TYPES = ("ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048", "rsa-3072", "rsa-4096")
_CURVES = {"ecdsa-p256": (ec.SECP256R1, "P-256", 32), "ecdsa-p384": (ec.SECP384R1, "P-384", 48),
           "ecdsa-p521": (ec.SECP521R1, "P-521", 66)}


class VaultError(Exception):
    def __init__(self, status: int, *messages: str):
        super().__init__(status, messages)
        self.status = status
        self.messages = list(messages)


class VersionRefused(VaultError):
    """
    The key version cannot sign: an item's ``error`` in a batch, but for a
    single sign a plain Go error, which Vault answers with 500.
    """

    def __init__(self, message: str):
        super().__init__(500, _go_error(message))
        self.message = message


def _lenient_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "t", "true", "yes", "on")
    return bool(value)


def _lenient_int(value: Any, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise VaultError(400, f"invalid {field}") from None


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_input(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as error:
        raise VaultError(400, f"unable to decode input as base64: {error}") from None


def _go_type(value: Any) -> str:
    """How Go's decoder names a JSON value's type in its complaints."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "map[string]interface {}"
    if isinstance(value, list):
        return "[]interface {}"
    return "string" if isinstance(value, str) else "json.Number"


def _go_error(message: str) -> str:
    """How Vault words an error that is not a request error (status 500): wrapped as a Go multierror."""
    return f"1 error occurred:\n\t* {message}\n\n"


def _unparsable_batch(detail: str) -> VaultError:
    return VaultError(500, _go_error(f"failed to parse batch input: {detail}"))


def batch_items(raw: Any) -> list[dict[str, str]]:
    """
    ``batch_input`` decoded as Vault does (into ``map[string]string``):
    numbers become their text and null the empty string, while a non-list,
    a non-object item or a boolean, object or list value fails the whole
    request with 500; an empty list is 400.
    """
    if not isinstance(raw, list):
        raise _unparsable_batch(f"'' source data must be an array or slice, got {_go_type(raw)}")
    if not raw:
        raise VaultError(400, "missing batch input to process")
    items = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _unparsable_batch(f"'[{index}]' expected type 'transit.batchRequestSignItem', "
                                    f"got unconvertible type '{_go_type(item)}'")
        decoded = {}
        for field, value in item.items():
            if isinstance(value, (bool, dict, list)):
                raise _unparsable_batch(f"'[{index}][{field}]' expected type 'string', "
                                        f"got unconvertible type '{_go_type(value)}'")
            decoded[field] = "" if value is None else value if isinstance(value, str) else json.dumps(value)
        items.append(decoded)
    return items


def rfc3339_nano(seconds: float) -> str:
    """
    An instant the way Vault's JSON shows a Go ``time.Time`` (``RFC3339Nano``):
    nanoseconds with trailing zeros (and a bare dot) dropped, UTC as ``Z``.
    """
    # The fraction on its own: scaling the whole instant would lose nanoseconds to float precision.
    whole = math.floor(seconds)
    carry, nanos = divmod(round((seconds - whole) * 1_000_000_000), 1_000_000_000)
    whole += carry
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + fraction + "Z"


@attrs.define
class TransitKey:
    name: str
    type: str
    #: when "now" is for ``creation_time``: the fake Vault's clock
    now: Callable[[], float] = time.time
    versions: list[Any] = attrs.field(factory=list)
    created: list[str] = attrs.field(factory=list)
    min_decryption_version: int = 1
    min_encryption_version: int = 0

    def rotate(self) -> None:
        if self.type == "ed25519":
            key: Any = ed25519.Ed25519PrivateKey.generate()
        elif self.type in _CURVES:
            key = ec.generate_private_key(_CURVES[self.type][0]())
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(self.type.split("-")[1]))
        self.versions.append(key)
        self.created.append(rfc3339_nano(self.now()))

    @property
    def latest(self) -> int:
        return len(self.versions)

    def public(self, version: int) -> dict[str, Any]:
        key = self.versions[version - 1].public_key()
        if self.type == "ed25519":
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            text, name = base64.b64encode(raw).decode(), "ed25519"
        else:
            text = key.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            name = _CURVES[self.type][1] if self.type in _CURVES else self.type
        return {"name": name, "public_key": text, "certificate_chain": "", "creation_time": self.created[version - 1]}

    def read(self) -> dict[str, Any]:
        return {
            "name": self.name, "type": self.type, "latest_version": self.latest,
            "min_available_version": 0, "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": self.min_encryption_version, "deletion_allowed": False, "derived": False,
            "exportable": False, "allow_plaintext_backup": False, "supports_encryption": False,
            "supports_decryption": False, "supports_derivation": False, "supports_signing": True,
            "auto_rotate_period": 0, "imported_key": False,
            "keys": {str(v): self.public(v) for v in range(self.min_decryption_version, self.latest + 1)},
        }


@attrs.define
class VaultToken:
    ttl: float
    expires_at: Optional[float]
    renewable: bool
    policies: list[str]


@attrs.define
class FakeVault:
    """Vault's state and its HTTP face (``app``)."""

    app: ClassVar[Klein] = Klein()

    clock: Any = None
    reactor: Any = None
    sealed: bool = False
    rate_limited: bool = False
    latency: float = 0.0
    tokens: dict[str, VaultToken] = attrs.field(factory=dict)
    keys: dict[str, TransitKey] = attrs.field(factory=dict)
    #: Kubernetes auth: service-account JWT -> (namespace, name) it proves, and role -> allowed accounts
    kubernetes_jwts: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    kubernetes_roles: dict[str, set[tuple[str, str]]] = attrs.field(factory=dict)
    login_ttl: int = 3600
    requests: Counter[str] = attrs.field(factory=Counter)
    last_sign_request: dict[str, Any] = attrs.field(factory=dict)
    #: the number of items of each ``batch_input`` sign request, in arrival order
    sign_batches: list[int] = attrs.field(factory=list)
    #: fault injection: the error Vault reports for a batch item with this (decoded) input, or None
    refuse_item: Optional[Callable[[bytes], Optional[str]]] = None
    #: fault injection: ``batch_results`` in reverse order (a proxy or server bug)
    reverse_batch_results: bool = False
    _watchers: list[tuple[str, int, Deferred[None]]] = attrs.field(factory=list)

    #: requests answered, by endpoint (``requests`` counts them as they arrive)
    answered: Counter[str] = attrs.field(factory=Counter)

    def requested(self, endpoint: str, count: int) -> Deferred[None]:
        """
        Fires once ``endpoint`` has answered ``count`` requests (at once if it
        already has): tests wait on it instead of on the wall clock.
        """
        done: Deferred[None] = Deferred()
        if self.answered[endpoint] >= count:
            done.callback(None)
        else:
            self._watchers.append((endpoint, count, done))
        return done

    def _answered(self, endpoint: str) -> None:
        self.answered[endpoint] += 1
        due = [watch for watch in self._watchers if watch[0] == endpoint and self.answered[endpoint] >= watch[1]]
        for watch in due:
            self._watchers.remove(watch)
            watch[2].callback(None)

    def now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def add_token(self, token: str, ttl: float = 0, renewable: bool = False,
                  policies: Optional[list[str]] = None) -> None:
        """``ttl`` 0: a token that never expires (like a root token)."""
        expires = self.now() + ttl if ttl else None
        self.tokens[token] = VaultToken(ttl, expires, renewable, policies or ["default", "signer"])

    def create_key(self, name: str, key_type: str = "ed25519") -> TransitKey:
        key = TransitKey(name, key_type, now=self.now)
        key.rotate()
        self.keys[name] = key
        return key

    # -- HTTP plumbing ---------------------------------------------------------------

    def _reply(self, request: IRequest, status: int, body: Optional[dict[str, Any]]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return b"" if body is None else json.dumps(body).encode()

    def _envelope(self, data: Any = None, auth: Any = None, warnings: Optional[list[str]] = None) -> dict[str, Any]:
        return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
                "data": data, "wrap_info": None, "warnings": warnings, "auth": auth, "mount_type": "transit"}

    def _token_of(self, request: IRequest) -> Optional[str]:
        token = request.getHeader(b"x-vault-token")
        if token is None:
            header = (request.getHeader(b"authorization") or b"").decode("latin-1")
            scheme, _, value = header.partition(" ")
            return value if scheme.lower() == "bearer" and value else None
        return token.decode("latin-1")

    def _authenticate(self, request: IRequest) -> str:
        token = self._token_of(request)
        record = self.tokens.get(token or "")
        if record is None or (record.expires_at is not None and self.now() >= record.expires_at):
            raise VaultError(403, "permission denied", "invalid token")
        assert token is not None
        return token

    def _body(self, request: IRequest) -> dict[str, Any]:
        raw = request.content.read() if request.content is not None else b""
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise VaultError(400, "failed to parse JSON input") from None
        if not isinstance(body, dict):
            raise VaultError(400, "failed to parse JSON input")
        return body

    async def _handle(self, request: IRequest, endpoint: str, work: Any, authenticated: bool = True) -> bytes:
        self.requests[endpoint] += 1
        if self.latency and self.reactor is not None:
            await deferLater(self.reactor, self.latency, lambda: None)
        try:
            if self.sealed:
                raise VaultError(503, "Vault is sealed")
            if self.rate_limited:
                raise VaultError(429, "request path \"/v1/transit\": rate limit quota exceeded")
            token = self._authenticate(request) if authenticated else None
            status, body = work(token)
        except VaultError as error:
            return self._reply(request, error.status, {"errors": error.messages})
        finally:
            self._answered(endpoint)
        return self._reply(request, status, body)

    # -- transit keys -------------------------------------------------------------------

    @app.route("/v1/transit/keys/<name>", methods=["GET", "POST", "PUT"])
    async def key(self, request: IRequest, name: str) -> bytes:
        def work(_: Optional[str]) -> tuple[int, Any]:
            if request.method == b"GET":
                if request.args.get(b"list") == [b"true"]:
                    return self._list()
                key = self.keys.get(name)
                if key is None:
                    raise VaultError(404)
                return 200, self._envelope(key.read())
            body = self._body(request)
            key_type = str(body.get("type", "aes256-gcm96"))
            warnings = None
            if name in self.keys:
                warnings = [f"key {name} already existed"]
            elif key_type not in KEY_TYPES:
                raise VaultError(400, f"unknown key type: {key_type}")
            else:
                self.create_key(name, key_type)
            return 200, self._envelope(self.keys[name].read(), warnings=warnings)

        return await self._handle(request, "keys", work)

    def _list(self) -> tuple[int, Any]:
        if not self.keys:
            raise VaultError(404)
        return 200, self._envelope({"keys": sorted(self.keys)})

    @app.route("/v1/transit/keys", methods=["LIST", "GET"])
    async def list_keys(self, request: IRequest) -> bytes:
        return await self._handle(request, "keys", lambda _: self._list())

    @app.route("/v1/transit/keys/<name>/rotate", methods=["POST", "PUT"])
    async def rotate(self, request: IRequest, name: str) -> bytes:
        def work(_: Optional[str]) -> tuple[int, Any]:
            key = self.keys.get(name)
            if key is None:
                raise VaultError(400, "key not found")
            key.rotate()
            return 200, self._envelope(key.read())

        return await self._handle(request, "rotate", work)

    @app.route("/v1/transit/keys/<name>/config", methods=["POST", "PUT"])
    async def configure(self, request: IRequest, name: str) -> bytes:
        def work(_: Optional[str]) -> tuple[int, Any]:
            key = self.keys.get(name)
            if key is None:
                raise VaultError(400, f"no existing key named {name} could be found")
            body = self._body(request)
            if "min_decryption_version" in body:
                key.min_decryption_version = _lenient_int(body["min_decryption_version"], "min_decryption_version")
            if "min_encryption_version" in body:
                key.min_encryption_version = _lenient_int(body["min_encryption_version"], "min_encryption_version")
            return 200, self._envelope(key.read())

        return await self._handle(request, "config", work)

    # -- sign and verify ------------------------------------------------------------------

    def _parameters(self, request: IRequest, name: str, hash_in_url: Optional[str],
                    missing_key: str) -> tuple[dict[str, Any], TransitKey, str, str]:
        """What a sign or verify request says for all its items, checked in Vault's order."""
        body = self._body(request)
        hash_name = hash_in_url or str(body.get("hash_algorithm", body.get("algorithm", "sha2-256")))
        if hash_name != "none" and hash_name not in HASHES:
            raise VaultError(400, f'invalid hash algorithm "{hash_name}"')
        marshaling = str(body.get("marshaling_algorithm", "asn1"))
        if marshaling not in ("asn1", "jws"):
            raise VaultError(400, f'invalid marshaling type "{marshaling}"')
        key = self.keys.get(name)
        if key is None:
            raise VaultError(400, missing_key)
        if hash_name == "none" and not (_lenient_bool(body.get("prehashed", False))
                                        and body.get("signature_algorithm") == "pkcs1v15"):
            raise VaultError(400, "hash_algorithm=none requires both prehashed=true and signature_algorithm=pkcs1v15")
        return body, key, hash_name, marshaling

    def _signing_version(self, key: TransitKey, body: dict[str, Any]) -> int:
        version = _lenient_int(body.get("key_version", 0), "key_version") or key.latest
        if version < 0:
            raise VersionRefused("requested version for signing is negative")
        if version > key.latest:
            raise VersionRefused("requested version for signing is higher than the latest key version")
        if version < max(1, key.min_encryption_version):
            raise VersionRefused("requested version for signing is less than the minimum encryption key version")
        return version

    def _padding(self, body: dict[str, Any], algorithm: Any) -> Any:
        scheme = str(body.get("signature_algorithm", "pss"))
        if scheme == "pkcs1v15":
            return padding.PKCS1v15()
        if scheme != "pss":
            raise VaultError(400, f"unsupported rsa signature algorithm {scheme}")
        salt = body.get("salt_length", "auto")
        if salt == "auto":
            length: Any = padding.PSS.MAX_LENGTH
        elif salt == "hash":
            length = padding.PSS.DIGEST_LENGTH
        else:
            length = _lenient_int(salt, "salt_length")
        return padding.PSS(mgf=padding.MGF1(algorithm), salt_length=length)

    def _sign_bytes(self, key: TransitKey, version: int, body: dict[str, Any], hash_name: str, data: bytes) -> bytes:
        private = key.versions[version - 1]
        if key.type == "ed25519":
            return bytes(private.sign(data))
        prehashed = _lenient_bool(body.get("prehashed", False))
        if hash_name == "none":
            raise VaultError(400, "unsupported in this fake: hash_algorithm=none")
        algorithm = HASHES[hash_name]()
        chosen: Any = utils.Prehashed(algorithm) if prehashed else algorithm
        if key.type in _CURVES:
            return bytes(private.sign(data, ec.ECDSA(chosen)))
        return bytes(private.sign(data, self._padding(body, algorithm), chosen))

    def _sign_item(self, key: TransitKey, body: dict[str, Any], hash_name: str, marshaling: str,
                   item: dict[str, str]) -> dict[str, Any]:
        """One input signed (Vault's per-item steps, in its order) or the :class:`VaultError` it fails with."""
        if "input" not in item:
            raise VaultError(400, "missing input")
        data = _decode_input(item["input"])
        if item.get("context"):
            try:
                base64.b64decode(item["context"], validate=True)
            except ValueError:
                raise VaultError(400, "failed to base64-decode context") from None
        refusal = self.refuse_item(data) if self.refuse_item is not None else None
        if refusal is not None:
            raise VaultError(400, refusal)
        version = self._signing_version(key, body)
        signature = self._sign_bytes(key, version, body, hash_name, data)
        if key.type in _CURVES and marshaling == "jws":
            r, s = utils.decode_dss_signature(signature)
            width = _CURVES[key.type][2]
            signature = r.to_bytes(width, "big") + s.to_bytes(width, "big")
        encoded = _b64url(signature) if marshaling == "jws" else base64.b64encode(signature).decode()
        return {"signature": f"vault:v{version}:{encoded}", "key_version": version}

    def _batch_results(self, key: TransitKey, body: dict[str, Any], hash_name: str, marshaling: str,
                       items: list[dict[str, str]]) -> list[dict[str, Any]]:
        """
        Vault's ``batch_results``: in request order, each with ``reference``
        (empty when none was sent) and ``key_version`` (0 when it failed), an
        item that fails carrying ``error`` instead of ``signature``.
        """
        results = []
        for item in items:
            try:
                result = self._sign_item(key, body, hash_name, marshaling, item)
            except VersionRefused as refused:
                result = {"key_version": 0, "error": refused.message}
            except VaultError as error:
                result = {"key_version": 0, "error": "; ".join(error.messages)}
            results.append(dict(result, reference=item.get("reference", "")))
        return results[::-1] if self.reverse_batch_results else results

    @app.route("/v1/transit/sign/<name>", methods=["POST", "PUT"], defaults={"hash_name": None})
    @app.route("/v1/transit/sign/<name>/<hash_name>", methods=["POST", "PUT"])
    async def sign(self, request: IRequest, name: str, hash_name: Optional[str]) -> bytes:
        def work(_: Optional[str]) -> tuple[int, Any]:
            body, key, chosen_hash, marshaling = self._parameters(request, name, hash_name, "signing key not found")
            self.last_sign_request = body
            if body.get("batch_input") is None:
                # Without batch_input a missing input signs the empty string, and any failure is the request's.
                item = {"input": str(body.get("input", "")), "context": str(body.get("context", ""))}
                return 200, self._envelope(self._sign_item(key, body, chosen_hash, marshaling, item))
            items = batch_items(body["batch_input"])
            self.sign_batches.append(len(items))
            # 200 even when some or all items failed: the errors are in the results.
            results = self._batch_results(key, body, chosen_hash, marshaling, items)
            return 200, self._envelope({"batch_results": results})

        return await self._handle(request, "sign", work)

    @app.route("/v1/transit/verify/<name>", methods=["POST", "PUT"], defaults={"hash_name": None})
    @app.route("/v1/transit/verify/<name>/<hash_name>", methods=["POST", "PUT"])
    async def verify(self, request: IRequest, name: str, hash_name: Optional[str]) -> bytes:
        def work(_: Optional[str]) -> tuple[int, Any]:
            body, key, chosen_hash, marshaling = self._parameters(request, name, hash_name,
                                                                  "signature verification key not found")
            data = _decode_input(str(body.get("input", "")))
            prefix, _, encoded = str(body.get("signature", "")).rpartition(":")
            if not prefix.startswith("vault:v"):
                raise VaultError(400, "invalid signature: missing vault version prefix")
            version = _lenient_int(prefix[len("vault:v"):], "signature version")
            if not 1 <= version <= key.latest:
                raise VaultError(400, "invalid signature version")
            try:
                raw = (base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)) if marshaling == "jws"
                       else base64.b64decode(encoded))
            except ValueError:
                raise VaultError(400, "invalid base64 signature value") from None
            public = key.versions[version - 1].public_key()
            try:
                if key.type == "ed25519":
                    public.verify(raw, data)
                else:
                    algorithm = HASHES[chosen_hash]()
                    chosen: Any = utils.Prehashed(algorithm) if _lenient_bool(body.get("prehashed")) else algorithm
                    if key.type in _CURVES:
                        if marshaling == "jws":
                            width = _CURVES[key.type][2]
                            raw = utils.encode_dss_signature(int.from_bytes(raw[:width], "big"),
                                                             int.from_bytes(raw[width:], "big"))
                        public.verify(raw, data, ec.ECDSA(chosen))
                    else:
                        scheme = self._padding(body, algorithm)
                        if isinstance(scheme, padding.PSS) and body.get("salt_length", "auto") == "auto":
                            scheme = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
                        public.verify(raw, data, scheme, chosen)
                valid = True
            except InvalidSignature:
                valid = False
            return 200, self._envelope({"valid": valid})

        return await self._handle(request, "verify", work)

    # -- auth ---------------------------------------------------------------------------------

    @app.route("/v1/auth/kubernetes/login", methods=["POST", "PUT"])
    async def kubernetes_login(self, request: IRequest) -> bytes:
        def work(_: Optional[str]) -> tuple[int, Any]:
            body = self._body(request)
            role, jwt = body.get("role"), body.get("jwt")
            if not role:
                raise VaultError(400, "missing role")
            if not jwt:
                raise VaultError(400, "missing jwt")
            if role not in self.kubernetes_roles:
                raise VaultError(400, f'invalid role name "{role}"')
            account = self.kubernetes_jwts.get(str(jwt))
            if account is None:
                raise VaultError(403, "permission denied")
            if account not in self.kubernetes_roles[role]:
                raise VaultError(403, "service account name not authorized")
            token = f"hvs.{uuid.uuid4().hex}"
            self.add_token(token, ttl=self.login_ttl, renewable=True)
            auth = {"client_token": token, "accessor": uuid.uuid4().hex, "policies": ["default", "signer"],
                    "token_policies": ["default", "signer"],
                    "metadata": {"role": role, "service_account_namespace": account[0],
                                 "service_account_name": account[1]},
                    "lease_duration": self.login_ttl, "renewable": True, "token_type": "service", "orphan": True}
            return 200, self._envelope(None, auth=auth)

        return await self._handle(request, "login", work, authenticated=False)

    @app.route("/v1/auth/token/lookup-self", methods=["GET"])
    async def lookup_self(self, request: IRequest) -> bytes:
        def work(token: Optional[str]) -> tuple[int, Any]:
            record = self.tokens[str(token)]
            ttl = int(record.expires_at - self.now()) if record.expires_at is not None else 0
            return 200, self._envelope({"id": token, "ttl": ttl, "renewable": record.renewable,
                                        "policies": record.policies})

        return await self._handle(request, "lookup-self", work)

    @app.route("/v1/auth/token/renew-self", methods=["POST", "PUT"])
    async def renew_self(self, request: IRequest) -> bytes:
        def work(token: Optional[str]) -> tuple[int, Any]:
            record = self.tokens[str(token)]
            if not record.renewable:
                raise VaultError(400, "lease is not renewable")
            record.expires_at = self.now() + record.ttl
            auth = {"client_token": token, "policies": record.policies, "lease_duration": int(record.ttl),
                    "renewable": True}
            return 200, self._envelope(None, auth=auth)

        return await self._handle(request, "renew-self", work)

    @app.route("/v1/sys/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        self.requests["health"] += 1
        status = 503 if self.sealed else 200
        return self._reply(request, status, {"initialized": True, "sealed": self.sealed, "standby": False,
                                             "version": "1.17.0-fake", "cluster_name": "fake"})


def main(argv: Optional[list[str]] = None) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.server import Site

    arguments = argparse.ArgumentParser(description="a fake Vault for tests and benchmarks (loopback only)")
    arguments.add_argument("--port", type=int, required=True)
    arguments.add_argument("--token", default="root")
    options = arguments.parse_args(argv)
    vault = FakeVault(reactor=reactor)
    vault.add_token(options.token)
    endpoint = TCP4ServerEndpoint(reactor, options.port, interface="127.0.0.1")
    listening: Deferred[Any] = endpoint.listen(Site(vault.app.resource()))
    listening.addCallback(lambda _: print(f"fake vault listening on {options.port}", flush=True))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
