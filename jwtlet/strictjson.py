"""
JSON written by someone jwtlet does not trust (a token, a JWKS, a discovery
document, an answer of a peer), read so that every way it can be hostile is
a ``ValueError`` and nothing else.
"""

from __future__ import annotations

import json

from jwtlet.model import JSONObject, JSONValue


def _no_duplicates(pairs: list[tuple[str, JSONValue]]) -> JSONObject:
    # RFC 7515 §4 / RFC 7519 §4: parsers that keep the first and parsers that
    # keep the last member would disagree about what was signed.
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member")
    return members


def _no_constant(name: str) -> JSONValue:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes) -> JSONValue:
    """
    The JSON value in ``data``; a ``ValueError`` for invalid UTF-8, duplicate
    members, ``NaN``/``Infinity``, integers past Python's digit limit, and
    nesting too deep for the parser (``RecursionError`` otherwise).
    """
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
