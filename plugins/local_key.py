"""
The ``local-key`` signer: private keys in local JWK or PEM files.  The first
key signs; every listed key is published, so rotating is adding a new file at
the head of ``key_files`` and dropping the old one once its tokens expired.
"""

from __future__ import annotations

import functools
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jwcrypto.jwk import JWK
from nacl.signing import SigningKey
from twisted.internet.defer import Deferred, succeed
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet import jsonout, keys
from jwtlet.config.reader import SectionReader, as_bool, as_nonempty_str, as_str, as_str_list, one_of
from jwtlet.interfaces import ISigner, ISignerFactory, PluginConfigError, PluginContext

#: The signature of a JWS signing input (RFC 7515 §5.1), as the ``alg`` defines it.
RawSign = Callable[[bytes], bytes]

#: RFC 7518 §3.1: the hash is the ``alg``'s digits.
_DIGESTS: Mapping[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512,
}



def raw_signer(key: JWK, algorithm: str) -> RawSign:
    """
    What signs for ``algorithm`` with ``key``: ``cryptography``'s own call on
    the private key jwcrypto loaded.  jwcrypto's JWS objects redo per token
    what is fixed per key (algorithm lookup, key checks, a header copy),
    which cost about half as much again as the Ed25519 signature itself.
    """
    private = key.get_op_key("sign")
    if algorithm == "EdDSA" and isinstance(private, Ed25519PrivateKey):
        return _ed25519(private)
    digest = _DIGESTS[algorithm[2:]]()
    if algorithm.startswith("ES") and isinstance(private, ec.EllipticCurvePrivateKey):
        return functools.partial(_ecdsa, private, ec.ECDSA(digest), (private.curve.key_size + 7) // 8)
    if algorithm.startswith("RS") and isinstance(private, rsa.RSAPrivateKey):
        return functools.partial(private.sign, padding=padding.PKCS1v15(), algorithm=digest)
    if algorithm.startswith("PS") and isinstance(private, rsa.RSAPrivateKey):
        # RFC 7518 §3.5: MGF1 with the same hash, a salt as long as the hash.
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        return functools.partial(private.sign, padding=pss, algorithm=digest)
    raise ValueError(f"{algorithm} cannot sign with a {key.get('kty')} key")


def _ed25519(private: Ed25519PrivateKey) -> RawSign:
    """
    Ed25519 through libsodium (PyNaCl): about 20 µs a signature here against
    32 µs through OpenSSL, the largest single step of a local-key exchange.
    Ed25519 signatures are deterministic, so the bytes are the same.
    """
    seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    signing_key = SigningKey(seed)
    return lambda data: signing_key.sign(data).signature


def _ecdsa(private: ec.EllipticCurvePrivateKey, scheme: ec.ECDSA, size: int, data: bytes) -> bytes:
    # cryptography returns DER; a JWS holds R and S as fixed-size big-endian
    # integers, one after the other (RFC 7518 §3.4).
    r, s = decode_dss_signature(private.sign(data, scheme))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _b64(data: bytes) -> bytes:
    return urlsafe_b64encode(data).rstrip(b"=")


@implementer(ISigner)
@attrs.define
class LocalKeySigner:
    signing_key: JWK
    algorithm: str
    jwks: dict[str, Any]
    _raw_sign: RawSign = attrs.field(
        init=False, repr=False,
        default=attrs.Factory(lambda self: raw_signer(self.signing_key, self.algorithm), takes_self=True),
    )
    #: The last header asked for and its encoded protected header: callers
    #: ask for the same header token after token.
    _last_header: tuple[dict[str, Any], bytes] = attrs.field(init=False, repr=False, factory=lambda: ({}, b""))

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> Deferred[str]:
        # NaN and infinities are not JSON: a claim holding one fails the
        # signing instead of making a token verifiers refuse.
        signing_input = self._protected(header) + b"." + _b64(jsonout.dumps_finite(claims))
        return succeed((signing_input + b"." + _b64(self._raw_sign(signing_input))).decode("ascii"))

    def _protected(self, header: dict[str, Any]) -> bytes:
        last, encoded = self._last_header
        if header != last or not encoded:
            encoded = _b64(jsonout.dumps_finite(dict(header, alg=self.algorithm, kid=self.signing_key.get("kid"))))
            # One assignment: a header never meets another header's encoding.
            self._last_header = (dict(header), encoded)
        return encoded

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
