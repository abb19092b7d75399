"""
The ``vault-transit`` signer: keys never leave Vault; jwtlet asks the transit
engine to sign.

Every signature names its key version (``kid`` = ``<key_name>-<version>``,
with ``key_version`` always sent, and the ``vault:vN:`` prefix of the answer
checked), so a rotation between reading the key and signing cannot produce a
token whose ``kid`` lies.  Key metadata is re-read every ``key_refresh_secs``:
a new version is published in the JWKS at once and signs only
``publish_before_use_secs`` after its ``creation_time`` in Vault, so every
replica (and every relying party's JWKS cache) has it before the first token
does, and a restart does not sign with a version created seconds ago.  A
version that stopped signing stays published until the tokens it signed have
expired.

Signs that wait at the same time go to Vault together: one ``transit/sign``
request with ``batch_input`` (at most ``batch_max`` items, waiting at most
``batch_window_ms`` for others to join).  A batch names one ``key_version``,
every item a ``reference`` checked in the answer as well as its position, so
no exchange can receive a signature made for another; an item Vault refuses
fails only its own exchange, while an outage fails the whole batch.

Over 400 lines because one Vault key's whole life is here: authentication
(token file or Kubernetes login), key metadata and rotation, publication
before use, batching and signing; each part reads the others' state.
"""

from __future__ import annotations

import base64
import contextvars
import json
import math
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional, Union

import attrs
from jwcrypto.common import JWException, base64url_encode
from jwcrypto.jwk import JWK
from twisted.application.service import IService, Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet import jsonout, strictjson
from jwtlet.config.reader import https_url
from jwtlet.interfaces import (
    DependencyUnavailable,
    IReadiness,
    ISigner,
    ISignerFactory,
    PluginConfigError,
    PluginContext,
)
from jwtlet.outbound import SingleFlight, TokenFile, build_http_client, close_http_client, read_answer

log = Logger(namespace="jwtlet.signer.vault")

KEY_TYPES = ("ed25519", "ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
_ECDSA = {"ecdsa-p256": ("ES256", "sha2-256"), "ecdsa-p384": ("ES384", "sha2-384")}
MISCONFIGURATION_LOG_INTERVAL = 60.0


class VaultMisconfigured(Exception):
    """Vault refused in a way only an operator can fix (unknown key, permission denied)."""


def algorithm_for(key_type: str, rsa_algorithm: str) -> str:
    if key_type == "ed25519":
        return "EdDSA"
    if key_type in _ECDSA:
        return _ECDSA[key_type][0]
    return rsa_algorithm


def sign_parameters(key_type: str, rsa_algorithm: str) -> dict[str, Any]:
    """The transit request fields that make a signature a valid JWS signature."""
    if key_type == "ed25519":
        return {"marshaling_algorithm": "jws"}
    if key_type in _ECDSA:
        return {"hash_algorithm": _ECDSA[key_type][1], "marshaling_algorithm": "jws"}
    if rsa_algorithm == "PS256":
        # JWS PS256 needs salt length = hash length; Vault's default is the maximum.
        return {"hash_algorithm": "sha2-256", "signature_algorithm": "pss", "salt_length": "hash",
                "marshaling_algorithm": "jws"}
    return {"hash_algorithm": "sha2-256", "signature_algorithm": "pkcs1v15", "marshaling_algorithm": "jws"}


def public_jwk(key_type: str, public_key: str) -> JWK:
    """Vault's published key: raw base64 for Ed25519, PEM for the rest."""
    if key_type == "ed25519":
        return JWK(kty="OKP", crv="Ed25519", x=base64url_encode(base64.b64decode(public_key)))
    return JWK.from_pem(public_key.encode())


def default_key_name(participant_context_claim: str) -> str:
    """The Rust jwtlet's key: ``signing-`` + ``token.participant_context_claim``, so its kids carry over."""
    return f"signing-{participant_context_claim}"


@attrs.frozen
class VaultOptions:
    url: str
    key_name: str = default_key_name("jwtlet_pc")
    mount: str = "transit"
    token: Optional[str] = None
    token_file: Optional[str] = None
    kubernetes_role: Optional[str] = None
    kubernetes_mount: str = "kubernetes"
    kubernetes_jwt_file: Optional[str] = None
    create_key: bool = True
    key_type: str = "ed25519"
    rsa_algorithm: str = "RS256"
    key_refresh_secs: float = 60.0
    publish_before_use_secs: float = 120.0
    timeout_secs: float = 5.0
    ca_file: Optional[str] = None
    batch_max: int = 32
    #: seconds a sign may wait for others to join its batch; 0: every sign is its own request
    batch_window: float = 0.002


@attrs.define
class SignBatch:
    """Signing inputs waiting to go to Vault in one request, all with one key version."""

    version: int
    inputs: list[str] = attrs.field(factory=list)
    waiters: list[Deferred[str]] = attrs.field(factory=list)
    timer: Optional[IDelayedCall] = None


def batch_request(version: int, inputs: list[str], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The ``transit/sign`` body for ``inputs``; each item's ``reference`` is its position."""
    items = [{"input": base64.b64encode(text.encode()).decode(), "reference": str(index)}
             for index, text in enumerate(inputs)]
    return dict(parameters, batch_input=items, key_version=version)


def batch_outcomes(version: int, count: int, data: Any) -> list[Union[str, VaultMisconfigured]]:
    """
    For each item of a :func:`batch_request` of ``count`` items signed with
    ``version``: its JWS signature, or why it has none.  Vault answers 200
    even when items fail (each then carries ``error``), in request order; an
    answer that cannot be matched item by item fails the whole batch.
    """
    results = data.get("batch_results") if isinstance(data, Mapping) else None
    if not isinstance(results, list) or len(results) != count:
        raise VaultMisconfigured("Vault's batch answer does not match the request")
    return [_item_outcome(version, index, result) for index, result in enumerate(results)]


def _item_outcome(version: int, index: int, result: Any) -> Union[str, VaultMisconfigured]:
    if not isinstance(result, Mapping):
        return VaultMisconfigured("Vault's batch answer has an unreadable item")
    # Position alone would hand a token another exchange's signature if a
    # proxy or a Vault bug reordered the results; Vaults too old to echo
    # references send none.
    reference = result.get("reference")
    if reference is not None and reference != str(index):
        return VaultMisconfigured("Vault's batch answer is out of order")
    if result.get("error"):
        return VaultMisconfigured(f"transit sign refused an item: {result['error']}")
    prefix, _, encoded = str(result.get("signature", "")).rpartition(":")
    if prefix != f"vault:v{version}" or not encoded:
        return VaultMisconfigured(f"Vault signed with {prefix or 'no version'}, not v{version}")
    return encoded


@attrs.frozen
class KeyVersion:
    version: int
    jwk: JWK
    #: Vault's ``creation_time`` (seconds since the epoch); when Vault gives
    #: none, the moment this process first saw the version.
    created_at: float


def parse_creation_time(value: Any) -> Optional[float]:
    """Vault's RFC 3339 ``creation_time`` (nanoseconds, Go style) in seconds; ``None`` when absent or unusable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Without an offset the instant is unknown (it is not RFC 3339).
    return moment.timestamp() if moment.tzinfo is not None else None


def signing_version(versions: Iterable[KeyVersion], min_encryption_version: int, publish_before_use: float,
                    now: float) -> Optional[KeyVersion]:
    """
    The version that signs at ``now``: the newest one Vault lets sign that was
    created at least ``publish_before_use`` seconds ago.  While none is that
    old (a key just created, or created and rotated at once) the oldest one
    signs: it has been published longest, and a key with one version signs
    with it.
    """
    signable = sorted((v for v in versions if v.version >= min_encryption_version), key=lambda v: v.version)
    ready = [v for v in signable if v.created_at + publish_before_use <= now]
    if ready:
        return ready[-1]
    return signable[0] if signable else None


def published_versions(versions: Iterable[KeyVersion], signing: Optional[KeyVersion], publish_before_use: float,
                       token_ttl: float, now: float) -> list[KeyVersion]:
    """
    The versions in the JWKS, newest first: all of them, except those older
    than the signing version once every token they could have signed has
    expired (the signing version took over ``publish_before_use`` after its
    creation, on every replica alike).
    """
    newest_first = sorted(versions, key=lambda v: -v.version)
    if signing is None:
        return newest_first
    took_over = signing.created_at + publish_before_use
    return [v for v in newest_first if v.version >= signing.version or now <= took_over + token_ttl]


class VaultAuth:
    """Where the Vault token comes from: a literal, a file, or Kubernetes login."""

    def __init__(self, options: VaultOptions, signer: VaultTransitSigner, sa_token_file: str):
        self.options = options
        self.signer = signer
        self.file = TokenFile(options.token_file) if options.token_file else None
        self.jwt_file = TokenFile(options.kubernetes_jwt_file or sa_token_file)
        self.login_token: Optional[str] = None
        self.renewal: Optional[Any] = None

    async def token(self) -> str:
        if self.options.token is not None:
            return self.options.token
        if self.file is not None:
            try:
                return self.file.read()
            except (OSError, ValueError) as error:
                raise DependencyUnavailable(f"vault token file: {error}") from None
        if self.login_token is None:
            await self.login()
        assert self.login_token is not None
        return self.login_token

    async def refused(self) -> bool:
        """The token was refused (403): get a fresh one if that is possible."""
        if self.file is not None:
            try:
                self.file.refused()
            except (OSError, ValueError):
                return False
            return True
        if self.options.kubernetes_role is not None:
            self.login_token = None
            return True
        return False

    async def login(self) -> None:
        try:
            jwt = self.jwt_file.read()
        except (OSError, ValueError) as error:
            raise DependencyUnavailable(f"service account token: {error}") from None
        path = f"/v1/auth/{self.options.kubernetes_mount}/login"
        code, body = await self.signer.call("POST", path, {"role": self.options.kubernetes_role, "jwt": jwt},
                                            token=None)
        if code != 200:
            raise VaultMisconfigured(f"Kubernetes login refused (HTTP {code})")
        auth = body.get("auth") or {}
        self.login_token = str(auth["client_token"])
        self.schedule_renewal(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))

    def schedule_renewal(self, lease: float, renewable: bool) -> None:
        self.cancel()
        if lease <= 0:
            return
        # Renew at two thirds of the lease; log in again if renewal fails.
        delay = lease * 2 / 3
        action = self.renew if renewable else self.login
        self.renewal = self.signer.clock.callLater(delay, lambda: ensureDeferred(self._quietly(action)))

    async def renew(self) -> None:
        code, body = await self.signer.call("POST", "/v1/auth/token/renew-self", {}, token=self.login_token)
        if code != 200:
            log.warn("Vault token renewal failed (HTTP {code}); logging in again", code=code)
            await self.login()
            return
        auth = body.get("auth") or {}
        self.schedule_renewal(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))

    async def _quietly(self, action: Any) -> None:
        try:
            await action()
        except Exception as error:
            log.warn("Vault authentication failed: {error}; retrying in 5 s", error=str(error))
            self.renewal = self.signer.clock.callLater(5, lambda: ensureDeferred(self._quietly(self.login)))

    def cancel(self) -> None:
        if self.renewal is not None and self.renewal.active():
            self.renewal.cancel()
        self.renewal = None


@implementer(ISigner, IReadiness, IService)
class VaultTransitSigner(Service):
    def __init__(self, options: VaultOptions, reactor: Any, clock: Any, token_ttl: float, sa_token_file: str):
        self.options = options
        self.clock = clock
        self.token_ttl = token_ttl
        self.algorithm = algorithm_for(options.key_type, options.rsa_algorithm)
        self.client = build_http_client(reactor, ca_file=options.ca_file)
        self.auth = VaultAuth(options, self, sa_token_file)
        self.versions: dict[int, KeyVersion] = {}
        self.min_encryption_version = 0
        self.key_type = options.key_type
        self._refreshing = LoopingCall(lambda: ensureDeferred(self._refresh_quietly()))
        self._refreshing.clock = clock
        self._last_misconfiguration_log = -1e18
        self._batch: Optional[SignBatch] = None
        self._reading: SingleFlight[None] = SingleFlight()
        if options.token is not None:
            log.warn("vault.token is a literal token in the config: use token_file or kubernetes_auth in production")

    # -- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._refreshing.start(self.options.key_refresh_secs, now=True)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._refreshing.running:
            self._refreshing.stop()
        # Signs already waiting are sent rather than dropped.
        self._flush()
        self.auth.cancel()
        return close_http_client(self.client)  # type: ignore[no-any-return]

    # -- HTTP ---------------------------------------------------------------------------

    async def call(self, method: str, path: str, body: Optional[dict[str, Any]], token: Optional[str]
                   ) -> tuple[int, Any]:
        headers: dict[Any, Any] = {"Content-Type": ["application/json"]}
        if token is not None:
            headers["X-Vault-Token"] = [token]
        try:
            response = await self.client.request(
                method, self.options.url + path, headers=headers,
                data=json.dumps(body).encode() if body is not None else None,
                timeout=self.options.timeout_secs, reactor=self.clock,
            )
            content = await read_answer(response, self.options.timeout_secs, self.clock)
        except CancelledError:
            raise DependencyUnavailable("vault: timed out") from None
        except Exception as error:
            raise DependencyUnavailable(f"vault: {type(error).__name__}") from None
        if response.code == 503 or response.code == 429 or response.code >= 500:
            raise DependencyUnavailable(f"vault: HTTP {response.code}")
        try:
            parsed = strictjson.loads(content) if content else {}
        except ValueError:
            parsed = {}
        return response.code, parsed if isinstance(parsed, dict) else {}

    async def authenticated(self, method: str, path: str, body: Optional[dict[str, Any]]) -> tuple[int, Any]:
        code, answer = await self.call(method, path, body, await self.auth.token())
        if code == 403 and await self.auth.refused():
            code, answer = await self.call(method, path, body, await self.auth.token())
        if code == 403:
            raise self.misconfigured(f"Vault refused jwtlet's token for {path} (permission denied)")
        return code, answer

    def misconfigured(self, message: str) -> VaultMisconfigured:
        return self.noted(VaultMisconfigured(message))

    def noted(self, error: VaultMisconfigured) -> VaultMisconfigured:
        """``error``, logged at most once a minute: a misconfiguration repeats on every exchange."""
        now = self.clock.seconds()
        if now - self._last_misconfiguration_log >= MISCONFIGURATION_LOG_INTERVAL:
            self._last_misconfiguration_log = now
            log.error("{message}", message=str(error))
        return error

    # -- keys -----------------------------------------------------------------------------

    @property
    def key_path(self) -> str:
        return f"/v1/{self.options.mount}/keys/{self.options.key_name}"

    def refresh(self) -> Deferred[None]:
        """Read the key from Vault; callers while a read is under way share it."""
        return self._reading(self._read_key)

    async def _read_key(self) -> None:
        code, body = await self.authenticated("GET", self.key_path, None)
        if code == 404 and self.options.create_key:
            code, body = await self.authenticated("POST", self.key_path, {"type": self.options.key_type})
            log.info("created transit key {name} ({type})", name=self.options.key_name, type=self.options.key_type)
        if code != 200:
            raise self.misconfigured(f"cannot read transit key {self.options.key_name} (HTTP {code})")
        try:
            data = body.get("data") or {}
            self.key_type = str(data.get("type", self.options.key_type))
            self.algorithm = algorithm_for(self.key_type, self.options.rsa_algorithm)
            self.min_encryption_version = int(data.get("min_encryption_version") or 0)
            self.observe({int(v): entry for v, entry in (data.get("keys") or {}).items()})
        except (AttributeError, KeyError, TypeError, ValueError, JWException):
            message = f"transit key {self.options.key_name}: Vault's key metadata is unreadable"
            raise self.misconfigured(message) from None

    def observe(self, published: Mapping[int, Mapping[str, Any]]) -> None:
        """Replace the versions we know with what Vault publishes now (``keys`` of a key read)."""
        now = self.clock.seconds()
        versions = {}
        for version, entry in published.items():
            known = self.versions.get(version)
            if known is None:
                created = parse_creation_time(entry.get("creation_time"))
                known = KeyVersion(version, public_jwk(self.key_type, entry["public_key"]),
                                   now if created is None else created)
            versions[version] = known
        # Versions Vault no longer lists were trimmed or fell below min_decryption_version.
        self.versions = versions

    def signing_version(self, now: float) -> Optional[KeyVersion]:
        return signing_version(self.versions.values(), self.min_encryption_version,
                               self.options.publish_before_use_secs, now)

    async def _refresh_quietly(self) -> None:
        # Whatever goes wrong, the LoopingCall must go on: a refresh that
        # raised would stop it, and rotations would no longer be seen.
        try:
            await self.refresh()
        except (DependencyUnavailable, VaultMisconfigured) as error:
            log.warn("refreshing the transit key failed: {error}", error=str(error))
        except Exception:
            log.failure("refreshing the transit key failed")

    # -- ISigner ------------------------------------------------------------------------------

    def kid(self, version: int) -> str:
        return f"{self.options.key_name}-{version}"

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> Deferred[str]:
        return ensureDeferred(self._sign(header, claims))

    async def _sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        if not self.versions:
            await self.refresh()
        now = self.clock.seconds()
        version = self.signing_version(now)
        if version is None:
            raise DependencyUnavailable("no transit key version may sign yet")
        protected = dict(header, alg=self.algorithm, kid=self.kid(version.version))
        # Compact UTF-8 JSON as the local-key signer writes it; NaN fails here, not at a verifier.
        encoded = (base64url_encode(jsonout.dumps_finite(part)) for part in (protected, claims))
        signing_input = ".".join(encoded)
        signature = await self._signature(version.version, signing_input)
        return f"{signing_input}.{signature}"

    # -- batching ---------------------------------------------------------------------------

    def _signature(self, version: int, signing_input: str) -> Deferred[str]:
        """The JWS signature of ``signing_input``, from the batch it joins."""
        batch = self._batch
        if batch is not None and batch.version != version:
            # The signing version changes only when a new one takes over:
            # what waits was decided under the old one and goes as it is.
            self._flush()
            batch = None
        if batch is None:
            batch = self._batch = SignBatch(version)
            if self.options.batch_window > 0:
                # The Vault call goes out from a timer: run it in the context of
                # the sign that opened the batch, so its trace span sits under
                # that exchange's ``sign`` span instead of starting a trace.
                batch.timer = self.clock.callLater(self.options.batch_window, contextvars.copy_context().run,
                                                   self._flush)
        waiter: Deferred[str] = Deferred()
        batch.inputs.append(signing_input)
        batch.waiters.append(waiter)
        if batch.timer is None or len(batch.inputs) >= self.options.batch_max:
            self._flush()
        return waiter

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if batch.timer is not None and batch.timer.active():
            batch.timer.cancel()
        ensureDeferred(self._send(batch))

    async def _send(self, batch: SignBatch) -> None:
        try:
            outcomes = await self._sign_batch(batch)
        except Exception as error:  # an outage or a refusal of the whole request: every sign in it fails
            for waiter in batch.waiters:
                waiter.errback(error)
            return
        for waiter, outcome in zip(batch.waiters, outcomes, strict=True):
            if isinstance(outcome, VaultMisconfigured):
                waiter.errback(self.noted(outcome))
            else:
                waiter.callback(outcome)

    async def _sign_batch(self, batch: SignBatch) -> list[Union[str, VaultMisconfigured]]:
        request = batch_request(batch.version, batch.inputs, sign_parameters(self.key_type, self.options.rsa_algorithm))
        code, body = await self.authenticated(
            "POST", f"/v1/{self.options.mount}/sign/{self.options.key_name}", request)
        if code != 200:
            errors = body.get("errors")
            raise self.misconfigured(f"transit sign refused (HTTP {code}: {'; '.join(map(str, errors or []))})")
        try:
            return batch_outcomes(batch.version, len(batch.inputs), body.get("data"))
        except VaultMisconfigured as error:
            raise self.noted(error) from None

    def public_jwks(self) -> Deferred[dict[str, Any]]:
        return ensureDeferred(self._public_jwks())

    async def _public_jwks(self) -> dict[str, Any]:
        if not self.versions:
            await self.refresh()
        now = self.clock.seconds()
        keys = []
        published = published_versions(self.versions.values(), self.signing_version(now),
                                       self.options.publish_before_use_secs, self.token_ttl, now)
        for entry in published:
            public = json.loads(entry.jwk.export_public())
            public.update(kid=self.kid(entry.version), alg=self.algorithm, use="sig")
            keys.append(public)
        return {"keys": keys}

    def check_ready(self) -> Deferred[None]:
        return self.refresh()


# -- options ------------------------------------------------------------------------------------

_OPTIONS = frozenset({"url", "token_file", "token", "kubernetes_auth", "mount", "key_name", "create_key", "key_type",
                      "rsa_algorithm", "key_refresh_secs", "publish_before_use_secs", "timeout_secs", "ca_file",
                      "batch_max", "batch_window_ms", "type"})
#: Vault's listener refuses a JSON body with more than 1,000 strings by
#: default (``max_request_json_strings``, names included): each batch item
#: carries four, so OpenBao refuses PS256 batches past 247 items.
BATCH_MAX_LIMIT = 200
#: Every sign may wait this long for company: past a second it is an outage of our own making.
BATCH_WINDOW_MS_LIMIT = 1000


def url_problem(url: Any, dev: bool) -> Optional[str]:
    """
    What is wrong with ``vault.url``: the Vault token travels with every
    request, so the outbound URL rule holds (https; http only to a loopback
    host or in ``--dev``).
    """
    if not isinstance(url, str) or not url:
        return "url: required for vault-transit (an https URL)"
    try:
        message = https_url(dev)(url)
    except ValueError:  # an unbalanced IPv6 bracket
        message = "must be an absolute https URL"
    return f"url: {message}" if message else None


def _number(raw: Mapping[str, Any], key: str, default: float, minimum: float, problems: list[str],
            maximum: Optional[float] = None, integer: bool = False) -> float:
    """A number option from ``minimum`` (to ``maximum``); absent or null: ``default``."""
    value = raw.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < minimum
            or (maximum is not None and value > maximum)):
        kind = "an integer" if integer else "a number"
        bounds = f"from {minimum:g} to {maximum:g}" if maximum is not None else f"of at least {minimum:g}"
        problems.append(f"{key}: must be {kind} {bounds}")
        return default
    return float(value)


def parse_options(raw: Mapping[str, Any], dev: bool, participant_context_claim: str = "jwtlet_pc") -> VaultOptions:
    """
    The ``vault`` table checked; ``dev``: running with ``--dev``;
    ``participant_context_claim`` names the default key (:func:`default_key_name`).
    """
    problems = [f"{key}: unknown key" for key in raw if key not in _OPTIONS]
    url = raw.get("url")
    problem = url_problem(url, dev)
    if problem is not None:
        problems.append(problem)
    sources = [key for key in ("token", "token_file", "kubernetes_auth") if raw.get(key) is not None]
    if len(sources) != 1:
        problems.append("token, token_file, kubernetes_auth: give exactly one")
    kubernetes = raw.get("kubernetes_auth")
    role, mount, jwt_file = None, "kubernetes", None
    if kubernetes is not None:
        if not isinstance(kubernetes, Mapping) or not isinstance(kubernetes.get("role"), str):
            problems.append("kubernetes_auth: must be a table with a role")
        else:
            problems.extend(f"kubernetes_auth.{key}: unknown key" for key in kubernetes
                            if key not in ("role", "mount", "jwt_file"))
            for key in ("mount", "jwt_file"):
                if kubernetes.get(key) is not None and (not isinstance(kubernetes[key], str) or not kubernetes[key]):
                    problems.append(f"kubernetes_auth.{key}: must be a non-empty string")
            role = kubernetes["role"]
            mount = kubernetes.get("mount") or "kubernetes"
            jwt_file = kubernetes.get("jwt_file")
    key_type = raw.get("key_type", "ed25519")
    if key_type not in KEY_TYPES:
        problems.append(f"key_type: must be one of {', '.join(KEY_TYPES)}")
    rsa_algorithm = raw.get("rsa_algorithm", "RS256")
    if rsa_algorithm not in ("RS256", "PS256"):
        problems.append("rsa_algorithm: must be RS256 or PS256")
    refresh = _number(raw, "key_refresh_secs", 60.0, 1, problems)
    # Every replica re-reads the key every key_refresh_secs: after twice that,
    # each has had the new version in its JWKS for a full interval.
    publish_before_use = _number(raw, "publish_before_use_secs", 2 * refresh, 0, problems)
    timeout = _number(raw, "timeout_secs", 5.0, 0.1, problems)
    batch_max = _number(raw, "batch_max", 32, 1, problems, BATCH_MAX_LIMIT, integer=True)
    batch_window_ms = _number(raw, "batch_window_ms", 2, 0, problems, BATCH_WINDOW_MS_LIMIT)
    create_key = raw.get("create_key", True)
    if not isinstance(create_key, bool):
        problems.append("create_key: must be true or false")
    for key in ("mount", "key_name", "token", "token_file", "ca_file"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or not raw[key]):
            problems.append(f"{key}: must be a non-empty string")
    if problems:
        raise PluginConfigError(*problems)
    return VaultOptions(
        url=str(url).rstrip("/"), key_name=raw.get("key_name") or default_key_name(participant_context_claim),
        mount=raw.get("mount", "transit"),
        token=raw.get("token"), token_file=raw.get("token_file"), kubernetes_role=role, kubernetes_mount=mount,
        kubernetes_jwt_file=jwt_file, create_key=create_key, key_type=key_type, rsa_algorithm=rsa_algorithm,
        ca_file=raw.get("ca_file"), key_refresh_secs=refresh, publish_before_use_secs=publish_before_use,
        timeout_secs=timeout, batch_max=int(batch_max), batch_window=batch_window_ms / 1000,
    )


@implementer(IPlugin, ISignerFactory)
@attrs.frozen
class VaultTransitSignerFactory:
    name: str = "vault-transit"
    description: str = "signs with HashiCorp Vault's transit engine (keys never leave Vault)"
    #: config.md: the top-level ``vault`` table holds this signer's options (and makes it the default signer)
    table: str = "vault"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> VaultTransitSigner:
        config = context.config
        parsed = parse_options(options, dev=config.dev,
                               participant_context_claim=config.token.participant_context_claim)
        return VaultTransitSigner(
            parsed, context.reactor, context.clock, float(config.token.token_ttl_secs), config.k8s.token_file)


vault_transit = VaultTransitSignerFactory()
