"""
The local-key signer's JWS, made with ``cryptography`` directly: every
algorithm a key can sign with verifies with three independent JOSE libraries
(PyJWT, joserfc, jwcrypto), and the encoding rules that are ours now hold.
"""

from __future__ import annotations

import base64
import json
import math
import types
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jws as joserfc_jws
from joserfc.jwk import KeySet
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS

from jwtlet import keys
from jwtlet.plugins.local_key import LocalKeySigner, _ecdsa, local_key, raw_signer

CLAIMS = {"iss": "https://jwtlet.test", "sub": "system:serviceaccount:ns:sa", "aud": "svc", "iat": 1_700_000_000,
          "exp": 4_000_000_000, "jti": "5b1f0e36-0e5c-4c3e-9d55-2f0a3c1d7e11",
          "nested": {"text": "ünïcode ☃", "n": [1, 2]}}


def key_for(algorithm: str) -> JWK:
    """A private key that signs with ``algorithm`` (RS*/PS* by the key's ``alg``)."""
    if algorithm.startswith(("RS", "PS")):
        key = JWK.generate(kty="RSA", size=2048)
    elif algorithm == "EdDSA":
        key = JWK.generate(kty="OKP", crv="Ed25519")
    else:
        key = JWK.generate(kty="EC", crv={"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[algorithm])
    key.update(kid=key.thumbprint(), alg=algorithm)
    return key


def build(tmp_path: Path, key: JWK) -> LocalKeySigner:
    path = tmp_path / "key.jwk"
    keys.write_new(path, key)
    return local_key.build({"key_file": str(path)}, types.SimpleNamespace(data_dir=tmp_path, check_only=False))


# Every alg keys.algorithm_for gives a key: the configurable ones and those a key file's own ``alg`` or curve picks.
ALGORITHMS = ("EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")  # joserfc prefers RFC 9864's "Ed25519"; EdDSA is still valid
@pytest_twisted.ensureDeferred
async def test_every_algorithm_verifies_with_pyjwt_joserfc_and_jwcrypto(tmp_path: Path, algorithm: str) -> None:
    signer = build(tmp_path, key_for(algorithm))
    assert signer.algorithm == algorithm
    token = await signer.sign({"typ": "JWT"}, dict(CLAIMS))
    public = (await signer.public_jwks())["keys"][0]

    assert pyjwt.decode(token, key=pyjwt.PyJWK.from_dict(public), algorithms=[algorithm], audience="svc") == CLAIMS

    verified = joserfc_jws.deserialize_compact(token, KeySet.import_key_set({"keys": [public]}),
                                               algorithms=[algorithm])
    assert json.loads(verified.payload) == CLAIMS
    assert verified.protected == {"typ": "JWT", "alg": algorithm, "kid": public["kid"]}

    checked = JWS()
    checked.deserialize(token, JWK(**public), alg=algorithm)
    assert json.loads(checked.payload) == CLAIMS


@pytest_twisted.ensureDeferred
async def test_a_token_signed_with_one_key_does_not_verify_with_another(tmp_path: Path) -> None:
    signer = build(tmp_path, key_for("EdDSA"))
    token = await signer.sign({"typ": "JWT"}, dict(CLAIMS))
    other = json.loads(key_for("EdDSA").export_public())
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(token, key=pyjwt.PyJWK.from_dict(other), algorithms=["EdDSA"], audience="svc")


@pytest_twisted.ensureDeferred
async def test_a_caller_changing_the_header_never_gets_the_previous_headers_encoding(tmp_path: Path) -> None:
    """The protected header is remembered between tokens; a different header must be encoded anew."""
    signer = build(tmp_path, key_for("ES256"))
    for header in ({"typ": "JWT"}, {"typ": "at+jwt"}, {}, {"typ": "JWT"}):
        token = await signer.sign(header, dict(CLAIMS))
        assert pyjwt.get_unverified_header(token) == {**header, "alg": "ES256", "kid": signer.signing_key["kid"]}


@pytest_twisted.ensureDeferred
async def test_a_caller_mutating_its_header_dict_gets_the_new_header(tmp_path: Path) -> None:
    signer = build(tmp_path, key_for("EdDSA"))
    header: dict[str, Any] = {"typ": "JWT"}
    await signer.sign(header, dict(CLAIMS))
    header["typ"] = "at+jwt"
    token = await signer.sign(header, dict(CLAIMS))
    assert pyjwt.get_unverified_header(token)["typ"] == "at+jwt"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_claim_that_is_not_json_fails_the_signing_instead_of_making_a_token(tmp_path: Path, value: float) -> None:
    """NaN and Infinity are not JSON: a verifier would refuse the token, so none is made."""
    signer = build(tmp_path, key_for("EdDSA"))
    with pytest.raises(ValueError):
        signer.sign({"typ": "JWT"}, dict(CLAIMS, bad=value))


def test_libsodium_signs_ed25519_with_the_same_bytes_as_openssl() -> None:
    """Ed25519 is deterministic: the libsodium signature is OpenSSL's, byte for byte, and verifies with it."""
    key = key_for("EdDSA")
    private = key.get_op_key("sign")
    for data in (b"", b"header.payload", bytes(range(256)) * 4):
        signature = raw_signer(key, "EdDSA")(data)
        assert signature == private.sign(data)
        private.public_key().verify(signature, data)


def test_claims_are_compact_utf8_json_in_the_order_given(tmp_path: Path) -> None:
    signer = build(tmp_path, key_for("EdDSA"))
    token = signer.sign({"typ": "JWT"}, dict(CLAIMS, huge=2**70)).result  # type: ignore[attr-defined]
    payload = base64.urlsafe_b64decode(token.split(".")[1] + "==")
    assert payload.startswith(b'{"iss":"https://jwtlet.test","sub":')
    assert "ünïcode ☃".encode() in payload, "non-ASCII is written as UTF-8, not escaped"
    assert json.loads(payload) == dict(CLAIMS, huge=2**70), "an integer beyond 64 bits is still written"


def test_ecdsa_r_and_s_are_left_padded_to_the_curve_size() -> None:
    """RFC 7518 §3.4: R and S are fixed-size big-endian; a short one (1 in 256 signatures) is zero-padded."""
    fake = types.SimpleNamespace(sign=lambda data, scheme: encode_dss_signature(1, 2**200))
    signature = _ecdsa(fake, ec.ECDSA(hashes.SHA256()), 32, b"input")
    assert signature == (1).to_bytes(32, "big") + (2**200).to_bytes(32, "big")
    assert len(signature) == 64


def test_a_key_that_cannot_sign_with_the_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot sign"):
        raw_signer(key_for("ES256"), "RS256")
