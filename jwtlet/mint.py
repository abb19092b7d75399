"""
``jwtlet mint``: write one signed token to a file and exit (the init-container
pattern, where the signing secret never reaches the application container).

Inputs come from flags or the environment (``SERVICE_NAME``, ``OUTPUT_PATH``,
``JWT_SECRET_KEY`` or ``JWT_SECRET``, ``JWT_ISSUER``, ``OUTPUT_MODE``).  Any
missing or invalid input exits with status 2 and one line naming the problem,
and leaves no file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Mapping, Optional, Sequence

from jwcrypto.common import base64url_encode, json_encode
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS

from jwtlet import keys
from jwtlet.files import PRIVATE_MODE as DEFAULT_MODE
from jwtlet.files import write_private
from jwtlet.model import JSONObject

MIN_SECRET_BYTES = 32
DEFAULT_ISSUER = "jwtlet-mint"
#: The registered claims mint sets itself: ``--claim`` adds claims, never replaces these.
PROTECTED_CLAIMS = ("iss", "sub", "iat", "exp", "nbf", "jti")
#: A token is a credential: its owner and, through the pod's ``fsGroup``, its
#: group may read it (``0640``); nobody else, and nobody executes it.
SHAREABLE_MODE_BITS = 0o660


class MintError(Exception):
    """One line for the user; exit status 2."""


def parser() -> argparse.ArgumentParser:
    mint = argparse.ArgumentParser(prog="jwtlet mint", description="write one signed JWT to a file")
    mint.add_argument("--service-name", help="the sub claim (env SERVICE_NAME)")
    mint.add_argument("--output-path", help="where to write the token (env OUTPUT_PATH)")
    mint.add_argument("--key-file", help="a private JWK or PEM (asymmetric); else JWT_SECRET_KEY/JWT_SECRET (HS256)")
    mint.add_argument("--issuer", help=f"the iss claim (env JWT_ISSUER; default {DEFAULT_ISSUER})")
    mint.add_argument("--mode", help="octal mode of the token file (env OUTPUT_MODE; default 0600)")
    mint.add_argument("--ttl", type=int, default=3600, help="seconds until exp (default 3600)")
    mint.add_argument("--no-expiry", action="store_true", help="no exp claim (--ttl is ignored)")
    mint.add_argument("--audience")
    mint.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE",
                      help="an extra claim; VALUE may be JSON (repeatable)")
    mint.add_argument("--role", default="service")
    return mint


def signing_key(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[JWK, str]:
    if args.key_file:
        try:
            key = keys.load(Path(args.key_file))
            return key, keys.algorithm_for(key)
        except keys.KeyFileError as error:
            raise MintError(f"key file: {error}") from None
    secret = environ.get("JWT_SECRET_KEY") or environ.get("JWT_SECRET")
    if not secret:
        raise MintError("no signing key: set JWT_SECRET_KEY (or JWT_SECRET), or give --key-file")
    raw = secret.encode("utf-8")
    if len(raw) < MIN_SECRET_BYTES:
        raise MintError(
            f"the shared secret must be at least {MIN_SECRET_BYTES} bytes (it has {len(raw)}): a shorter HS256 "
            "secret can be guessed offline from any token it signed; make one with `openssl rand -base64 48`")
    return JWK(kty="oct", k=base64url_encode(raw)), "HS256"


def extra_claims(pairs: Sequence[str]) -> JSONObject:
    claims: JSONObject = {}
    for pair in pairs:
        name, separator, text = pair.partition("=")
        if not separator or not name:
            raise MintError(f"--claim {pair!r}: use KEY=VALUE")
        if name in PROTECTED_CLAIMS:
            raise MintError(f"--claim {name}: '{name}' is set by jwtlet mint and cannot be replaced")
        try:
            claims[name] = json.loads(text)
        except ValueError:
            claims[name] = text
    return claims


def file_mode(text: str, source: str) -> int:
    """An octal file mode (``0640``) a token file may have; ``source`` names where it came from."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise MintError(f"{source} {text}: give an octal file mode such as 0640") from None
    if mode & ~SHAREABLE_MODE_BITS or not mode & 0o400:
        raise MintError(f"{source} {text}: a token file is readable by its owner and at most its group "
                        "(0600, or 0640 with the pod's fsGroup)")
    return mode


def build_claims(args: argparse.Namespace, service: str, issuer: str, now: int) -> JSONObject:
    claims: JSONObject = {"iss": issuer, "sub": service, "iat": now, "jti": str(uuid.uuid4()), "role": args.role}
    if not args.no_expiry:
        if args.ttl <= 0:
            raise MintError("--ttl must be a positive number of seconds")
        claims["exp"] = now + args.ttl
    if args.audience:
        claims["aud"] = args.audience
    claims.update(extra_claims(args.claim))
    return claims


def mint(argv: Sequence[str], environ: Mapping[str, str], now: Optional[int] = None) -> int:
    args = parser().parse_args(argv)
    try:
        service = args.service_name or environ.get("SERVICE_NAME")
        if not service:
            raise MintError("no service name: give --service-name or set SERVICE_NAME")
        output = args.output_path or environ.get("OUTPUT_PATH")
        if not output:
            raise MintError("no output path: give --output-path or set OUTPUT_PATH")
        mode = DEFAULT_MODE
        if args.mode is not None:
            mode = file_mode(args.mode, "--mode")
        elif environ.get("OUTPUT_MODE"):
            mode = file_mode(environ["OUTPUT_MODE"], "OUTPUT_MODE")
        issuer = args.issuer or environ.get("JWT_ISSUER") or DEFAULT_ISSUER
        key, algorithm = signing_key(args, environ)
        claims = build_claims(args, service, issuer, int(time.time()) if now is None else now)
        header = {"alg": algorithm, "typ": "JWT"}
        if key.get("kid"):
            header["kid"] = key.get("kid")
        jws = JWS(json_encode(claims).encode("utf-8"))
        jws.add_signature(key, alg=algorithm, protected=json_encode(header))
        try:
            write_private(Path(output), jws.serialize(compact=True).encode("ascii"), mode=mode)
        except OSError as error:
            raise MintError(f"cannot write {output}: {error.strerror}") from None
    except MintError as error:
        sys.stderr.write(f"jwtlet mint: {error}\n")
        return 2
    sys.stderr.write(f"token written to {output}\n")
    return 0
