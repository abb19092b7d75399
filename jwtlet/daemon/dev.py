"""
Everything of ``--dev`` (config.md, "The embedded default"), in one room: the
embedded configuration, the development issuer (a key pair standing in for a
Kubernetes cluster, its static JWKS file trusted by that configuration, and
subject tokens shaped like projected service-account tokens), the example
seeded once per data directory, and the instructions printed at start.
Nothing here is reached by a non-dev code path except ``jwtlet dev-token``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import attrs
from jwcrypto.common import json_encode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS
from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from jwtlet import keys
from jwtlet.config import Config
from jwtlet.files import write_private
from jwtlet.interfaces import Conflict
from jwtlet.model import ResourceMapping, ScopeMapping

if TYPE_CHECKING:
    from jwtlet.providers import Store

log = Logger(namespace="jwtlet.daemon")

ISSUER = "https://kubernetes.dev.jwtlet.invalid"
CLIENT_AUDIENCE = "jwtlet-dev"
AUDIENCE = "jwtlet-dev-service"
ADMIN = "system:serviceaccount:jwtlet:admin"
ISSUER_JWKS = "dev-issuer.jwks.json"
ISSUER_KEY = "dev-issuer.jwk"
ALGORITHM = "ES256"

#: Written in the data directory once ``--dev`` has seeded its store.
SEEDED_MARKER = ".dev-seeded"
EXAMPLE_SCOPE = ScopeMapping(scope="read", claims={"role": "reader"})
EXAMPLE_MAPPING = ResourceMapping(
    client_identifier="system:serviceaccount:default:demo", participant_context="demo", scopes=("read",)
)


def defaults(data_dir: Path) -> dict[str, object]:
    """The complete embedded configuration of ``--dev``, files in ``data_dir``."""
    return {
        "issuer": "http://127.0.0.1:8080",
        "bind": "127.0.0.1",
        "storage_backend": {"type": "sqlite", "path": str(data_dir / "jwtlet.sqlite3")},
        "validator": {
            "type": "kubernetes-oidc",
            "issuers": [{"issuer": ISSUER, "jwks_file": str(data_dir / ISSUER_JWKS)}],
        },
        "token": {"client_audience": CLIENT_AUDIENCE, "audience": AUDIENCE},
        "signer": {
            "type": "local-key",
            "key_file": str(data_dir / "signing-key.jwk"),
            "generate": True,
        },
        "service_accounts": {ADMIN: ["management:write"]},
    }


# -- the development issuer ------------------------------------------------------


def ensure(data_dir: Path) -> JWK:
    """The dev issuer's key, created (with its JWKS file) on first use."""
    key_path = data_dir / ISSUER_KEY
    if not key_path.exists():
        try:
            keys.write_new(key_path, keys.generate(ALGORITHM))
        except FileExistsError:
            pass  # another process created it first; use theirs
    key = keys.load(key_path)
    jwks_path = data_dir / ISSUER_JWKS
    document = json.dumps({"keys": [keys.public_jwk(key, ALGORITHM)]}, indent=2)
    # Rewritten only when it differs, so a running validator is not made to reload for nothing.
    if not jwks_path.exists() or jwks_path.read_text(encoding="utf-8") != document:
        write_private(jwks_path, document.encode("utf-8"))
    return key


def service_account_uid(namespace: str, name: str) -> str:
    """A stable uid per service account, as a cluster would keep one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ISSUER}/{namespace}/{name}"))


def mint(
    data_dir: Path,
    namespace: str,
    name: str,
    now: int,
    audience: str = CLIENT_AUDIENCE,
    ttl: int = 3600,
    token_id: Optional[str] = None,
) -> str:
    """A subject token for ``system:serviceaccount:<namespace>:<name>``."""
    key = ensure(data_dir)
    claims = {
        "aud": [audience],
        "exp": now + ttl,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": token_id or str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": service_account_uid(namespace, name)},
        },
        "sub": f"system:serviceaccount:{namespace}:{name}",
    }
    jws = JWS(json_encode(claims).encode("utf-8"))
    jws.add_signature(key, alg=ALGORITHM, protected=json_encode({"alg": ALGORITHM, "kid": key.get("kid")}))
    return str(jws.serialize(compact=True))


# -- at start ----------------------------------------------------------------------


@attrs.define
class DevSeed(Service):
    """
    Seeds the example scope and mapping once per data directory: a marker
    written after a successful seed means an operator who deleted the
    examples does not get them back at the next start.
    """

    store: Store
    data_dir: Path

    def startService(self) -> None:
        Service.startService(self)
        ensureDeferred(self.seed()).addErrback(lambda f: log.failure("seeding the dev store failed", f))

    async def seed(self) -> None:
        marker = self.data_dir / SEEDED_MARKER
        if marker.exists():
            return
        try:
            await self.store.add_scope(EXAMPLE_SCOPE)
        except Conflict:
            pass  # a worker beside us seeded first, or a start that failed before the marker
        try:
            await self.store.add_mapping(EXAMPLE_MAPPING)
        except Conflict:
            pass
        write_private(marker, b"")


def instructions(config: Config) -> str:
    """What ``--dev`` prints at start: how to mint a subject token and exchange it."""
    token_url = f"http://127.0.0.1:{config.token_exchange_port}"
    management_url = f"http://127.0.0.1:{config.management_port}"
    directory = str(config.data_dir)
    return "\n".join(
        [
            f"jwtlet --dev: token exchange on {token_url}, management on {management_url}",
            "Exchange a development service account token for a jwtlet token:",
            f"  TOKEN=$(jwtlet dev-token default:demo --data-dir {directory})",
            f"  curl -s {token_url}/token"
            " -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange"
            " -d subject_token_type=urn:ietf:params:oauth:token-type:jwt"
            ' --data-urlencode "subject_token=$TOKEN" -d resource=demo -d scope=read',
            "Administer mappings:",
            f"  ADMIN=$(jwtlet dev-token jwtlet:admin --data-dir {directory})",
            f'  curl -s -H "Authorization: Bearer $ADMIN" {management_url}/api/v1/mappings',
            "",
        ]
    )
