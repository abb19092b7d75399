"""
The development issuer of ``--dev``: a key pair standing in for a Kubernetes
cluster, its static JWKS file (trusted by the dev config's kubernetes-oidc
validator), and subject tokens shaped like projected service-account tokens.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Optional

from jwcrypto.common import json_encode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS

from jwtlet import keys
from jwtlet.config.schema import DEV_CLIENT_AUDIENCE, DEV_ISSUER, DEV_ISSUER_JWKS, DEV_ISSUER_KEY

ALGORITHM = "ES256"


def ensure(data_dir: Path) -> JWK:
    """The dev issuer's key, created (with its JWKS file) on first use."""
    key_path = data_dir / DEV_ISSUER_KEY
    if not key_path.exists():
        try:
            keys.write_new(key_path, keys.generate(ALGORITHM))
        except FileExistsError:
            pass  # another process created it first; use theirs
    key = keys.load(key_path)
    jwks_path = data_dir / DEV_ISSUER_JWKS
    document = json.dumps({"keys": [keys.public_jwk(key, ALGORITHM)]}, indent=2)
    if not jwks_path.exists() or jwks_path.read_text(encoding="utf-8") != document:
        temporary = jwks_path.with_name(f".{jwks_path.name}.{os.getpid()}")
        temporary.write_text(document, encoding="utf-8")
        temporary.replace(jwks_path)
    return key


def service_account_uid(namespace: str, name: str) -> str:
    """A stable uid per service account, as a cluster would keep one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{DEV_ISSUER}/{namespace}/{name}"))


def mint(
    data_dir: Path,
    namespace: str,
    name: str,
    now: int,
    audience: str = DEV_CLIENT_AUDIENCE,
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
        "iss": DEV_ISSUER,
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
