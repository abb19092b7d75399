"""
A complete signer plugin, as a plugin author would write it: an Ed25519 key
derived from a 32-byte seed file (for deployments that provision the seed
from a secret store rather than a JWK).  Put this module in a directory
listed in ``plugin_dirs`` and use ``signer: {type: seeded-ed25519, seed_file: ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jwcrypto.common import json_encode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWSCore
from twisted.internet.defer import Deferred, succeed
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.interfaces import ISigner, ISignerFactory, PluginConfigError, PluginContext


@implementer(ISigner)
class SeededEd25519Signer:
    algorithm = "EdDSA"

    def __init__(self, key: JWK):
        self.key = key
        public = json.loads(key.export_public())
        public.update(kid=key.get("kid"), alg="EdDSA", use="sig")
        self.jwks = {"keys": [public]}

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> Deferred[str]:
        protected = dict(header, alg="EdDSA", kid=self.key.get("kid"))
        signed = JWSCore("EdDSA", self.key, json_encode(protected), json_encode(claims).encode()).sign()
        return succeed(f"{signed['protected']}.{signed['payload'].decode()}.{signed['signature']}")

    def public_jwks(self) -> Deferred[dict[str, Any]]:
        return succeed(self.jwks)


@implementer(IPlugin, ISignerFactory)
class SeededEd25519SignerFactory:
    name = "seeded-ed25519"
    description = "signs with an Ed25519 key derived from a 32-byte seed file"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> SeededEd25519Signer:
        problems = [f"{key}: unknown key" for key in options if key != "seed_file"]
        seed_file = options.get("seed_file")
        if not isinstance(seed_file, str):
            problems.append("seed_file: required (a file holding 32 random bytes)")
        if problems:
            raise PluginConfigError(*problems)
        seed = Path(seed_file).read_bytes()  # type: ignore[arg-type]
        if len(seed) != 32:
            raise PluginConfigError(f"seed_file: must hold exactly 32 bytes, not {len(seed)}")
        pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        key = JWK.from_pem(pem)
        key.update(kid=key.thumbprint())
        return SeededEd25519Signer(key)


seeded_ed25519 = SeededEd25519SignerFactory()
