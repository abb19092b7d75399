"""
Private signing keys on disk: generate, write (mode 0600, atomically, never
over an existing file), load from JWK or PEM, and pick the JWS algorithm a
key signs with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from jwcrypto.jwk import JWK

from jwtlet.files import write_private

ALGORITHMS = ("EdDSA", "ES256", "ES384", "RS256", "PS256")

_CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}


class KeyFileError(ValueError):
    """A key file that cannot be used, with a message fit for config errors."""


def generate(algorithm: str) -> JWK:
    """A new private key for ``algorithm``, with ``kid`` (RFC 7638 thumbprint) and ``alg``."""
    if algorithm == "EdDSA":
        key = JWK.generate(kty="OKP", crv="Ed25519")
    elif algorithm == "ES256":
        key = JWK.generate(kty="EC", crv="P-256")
    elif algorithm == "ES384":
        key = JWK.generate(kty="EC", crv="P-384")
    elif algorithm in ("RS256", "PS256"):
        key = JWK.generate(kty="RSA", size=2048)
    else:
        raise KeyFileError(f"unsupported algorithm {algorithm!r} (use one of {', '.join(ALGORITHMS)})")
    key.update(kid=key.thumbprint(), alg=algorithm, use="sig")
    return key


def write_new(path: Path, key: JWK) -> None:
    """Write a private JWK to ``path`` (mode 0600, atomically); never replace an existing file."""
    write_private(path, key.export_private().encode("utf-8"), exclusive=True)


def load(path: Path) -> JWK:
    """A private key from a JWK (JSON) or PEM file, with ``kid`` set."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read: {error.strerror}") from None
    try:
        if data.lstrip().startswith(b"{"):
            key = JWK.from_json(data.decode("utf-8"))
        else:
            key = JWK.from_pem(data)
    except Exception as error:  # jwcrypto raises several unrelated types
        raise KeyFileError(f"{path}: not a JWK or PEM private key ({type(error).__name__})") from None
    if not key.has_private:
        raise KeyFileError(f"{path}: holds a public key; a private key is needed to sign")
    if key.get("kty") == "oct":
        raise KeyFileError(f"{path}: symmetric keys cannot sign tokens others verify")
    if not key.get("kid"):
        key.update(kid=key.thumbprint())
    return key


def algorithm_for(key: JWK, preferred: Optional[str] = None) -> str:
    """
    The JWS ``alg`` of ``key``: the curve decides for EC and OKP keys; RSA keys
    sign RS256 unless the key (or the caller) says PS256.
    """
    kty = key.get("kty")
    if kty in ("EC", "OKP"):
        curve = key.get("crv")
        if curve not in _CURVE_ALGORITHMS:
            raise KeyFileError(f"unsupported curve {curve!r}")
        return _CURVE_ALGORITHMS[curve]
    if kty == "RSA":
        chosen = preferred or key.get("alg") or "RS256"
        if chosen not in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
            raise KeyFileError(f"unsupported RSA algorithm {chosen!r}")
        return str(chosen)
    raise KeyFileError(f"unsupported key type {kty!r}")


def public_jwk(key: JWK, algorithm: str) -> dict[str, str]:
    """The public members of ``key`` as a JWKS entry."""
    public = json.loads(key.export_public())
    public.update(kid=key.get("kid"), alg=algorithm, use="sig")
    return {name: value for name, value in public.items() if name != "key_ops"}
