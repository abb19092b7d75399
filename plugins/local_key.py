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
from jwtlet.config.reader import SectionReader, as_bool, as_nonempty_str, as_str, as_str_list, one_of
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


def _key_paths(section: SectionReader, context: PluginContext) -> list[Path]:
    single: Optional[str] = section.get("key_file", as_nonempty_str, None)
    several: Optional[tuple[str, ...]] = section.get("key_files", as_str_list, None, check=_not_empty)
    if section.present("key_file") and section.present("key_files"):
        section.problem("key_file and key_files", "give one of them")
    if several is not None:
        return [Path(path) for path in several]
    if single is not None:
        return [Path(single)]
    if section.present("key_file") or section.present("key_files"):
        return []  # reported above
    return [Path(context.data_dir) / "signing-key.jwk"]


def _not_empty(paths: tuple[str, ...]) -> Optional[str]:
    return None if paths and all(paths) else "must be a non-empty list of paths"


@implementer(IPlugin, ISignerFactory)
@attrs.frozen
class LocalKeySignerFactory:
    name: str = "local-key"
    description: str = "signs with private keys from local JWK or PEM files (EdDSA, ES256/384, RS256, PS256)"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> LocalKeySigner:
        problems: list[str] = []
        section = SectionReader(options, "", problems)
        generate = section.get("generate", as_bool, False)
        preferred: Optional[str] = section.get("algorithm", as_str, None, check=one_of(*keys.ALGORITHMS))
        paths = _key_paths(section, context)
        section.finish()
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
            except keys.KeyFileError as error:
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
