"""
The ``local-key`` signer: private keys in local JWK or PEM files.  The first
key signs; every listed key is published, so rotating is adding a new file at
the head of ``key_files`` and dropping the old one once its tokens expired.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import attrs
from jwcrypto.common import json_encode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWSCore
from twisted.internet.defer import Deferred, succeed
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet import keys
from jwtlet.interfaces import ISigner, ISignerFactory, PluginConfigError, PluginContext


@implementer(ISigner)
@attrs.define
class LocalKeySigner:
    signing_key: JWK
    algorithm: str
    jwks: dict[str, Any]

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> Deferred[str]:
        protected = dict(header, alg=self.algorithm, kid=self.signing_key.get("kid"))
        # JWSCore rather than JWS: the same signing, without building a header
        # registry per token (a measurable share of each exchange).
        signed = JWSCore(self.algorithm, self.signing_key, json_encode(protected),
                         json_encode(claims).encode("utf-8")).sign()
        return succeed(f"{signed['protected']}.{signed['payload'].decode('ascii')}.{signed['signature']}")

    def public_jwks(self) -> Deferred[dict[str, Any]]:
        return succeed(self.jwks)


def _key_paths(options: Mapping[str, Any], context: PluginContext, problems: list[str]) -> list[Path]:
    single = options.get("key_file")
    several = options.get("key_files")
    if single is not None and several is not None:
        problems.append("key_file and key_files: give one of them")
    if several is not None:
        if not isinstance(several, list) or not several or not all(isinstance(p, str) for p in several):
            problems.append("key_files: must be a non-empty list of paths")
            return []
        return [Path(p) for p in several]
    if single is None:
        return [Path(context.data_dir) / "signing-key.jwk"]
    if not isinstance(single, str) or not single:
        problems.append("key_file: must be a path")
        return []
    return [Path(single)]


@implementer(IPlugin, ISignerFactory)
@attrs.frozen
class LocalKeySignerFactory:
    name: str = "local-key"
    description: str = "signs with private keys from local JWK or PEM files (EdDSA, ES256/384, RS256, PS256)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> LocalKeySigner:
        problems = [f"{key}: unknown key" for key in options
                    if key not in ("key_file", "key_files", "generate", "algorithm")]
        generate = options.get("generate", False)
        if not isinstance(generate, bool):
            problems.append("generate: must be true or false")
        preferred = options.get("algorithm")
        if preferred is not None and preferred not in keys.ALGORITHMS:
            problems.append(f"algorithm: must be one of {', '.join(keys.ALGORITHMS)}")
        paths = _key_paths(options, context, problems)
        if problems:
            raise PluginConfigError(*problems)
        unwritten: Optional[JWK] = None
        if generate is True and paths and not paths[0].exists():
            generated = keys.generate(preferred or "EdDSA")
            if context.check_only:
                unwritten = generated  # check-config creates nothing: this stands for the key the daemon writes
            else:
                try:
                    keys.write_new(paths[0], generated)
                except FileExistsError:
                    pass  # another process (a replica starting beside us) wrote it first: use theirs
        loaded = []
        for index, path in enumerate(paths):
            try:
                key = unwritten if index == 0 and unwritten is not None else keys.load(path)
                loaded.append((key, keys.algorithm_for(key, preferred)))
            except keys.KeyError_ as error:
                problems.append(f"key_file: {error}")
        if problems:
            raise PluginConfigError(*problems)
        signing_key, algorithm = loaded[0]
        return LocalKeySigner(
            signing_key=signing_key,
            algorithm=algorithm,
            jwks={"keys": [keys.public_jwk(key, alg) for key, alg in loaded]},
        )


local_key = LocalKeySignerFactory()
