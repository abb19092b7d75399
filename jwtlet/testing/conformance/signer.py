"""
The conformance suite every ISigner must pass (plugin authors: run it on
yours): what it signs verifies with an independent JOSE library (PyJWT),
using nothing but the JWKS it publishes.
"""

from __future__ import annotations

import json
from typing import Any

import jwt as pyjwt
from zope.interface.verify import verifyObject

from jwtlet.interfaces import ISigner
from jwtlet.providers import as_deferred

_HMAC_OR_NONE = {"none", "HS256", "HS384", "HS512"}


def _decode_header(token: str) -> dict[str, Any]:
    return pyjwt.get_unverified_header(token)


async def assert_signer_conforms(signer: Any, audience: str = "conformance") -> list[str]:
    """
    Sign several tokens with ``signer`` and verify each against the JWKS the
    signer publishes, with PyJWT.  Returns the tokens for further checks.
    """
    verifyObject(ISigner, signer)
    assert signer.algorithm not in _HMAC_OR_NONE
    tokens = []
    for index in range(3):
        claims = {
            "iss": "https://jwtlet.test",
            "sub": f"subject-{index}",
            "aud": audience,
            "iat": 1_700_000_000,
            "exp": 4_000_000_000,
            "nested": {"n": index, "text": "ünïcode"},
        }
        token = await as_deferred(signer.sign({"typ": "JWT"}, dict(claims)))
        assert isinstance(token, str)
        tokens.append(token)
        jwks = await as_deferred(signer.public_jwks())
        assert json.loads(json.dumps(jwks)) == jwks, "the JWKS must be plain JSON"
        header = _decode_header(token)
        assert header["alg"] == signer.algorithm
        assert header["typ"] == "JWT"
        by_kid = {key["kid"]: key for key in jwks["keys"]}
        assert header["kid"] in by_kid, "the kid that signed must be published"
        public = by_kid[header["kid"]]
        assert public.get("use", "sig") == "sig"
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(public), "private members leaked"
        key = pyjwt.PyJWK.from_dict(public)
        decoded = pyjwt.decode(token, key=key, algorithms=[header["alg"]], audience=audience)
        assert decoded == claims
    return tokens
