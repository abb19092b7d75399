"""
JSON written by someone jwtlet does not trust (a token, a JWKS, a discovery
document, an answer of a peer), read so that every way it can be hostile is
a ``ValueError`` and nothing else.
"""

from __future__ import annotations

import json
import math
import re

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


def _finite(text: str) -> float:
    # ``1e400`` is valid JSON text that Python reads as infinity, which no
    # JSON writer can write back.
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("a number too large for a double")
    return number


# Only an escape can put a lone surrogate into a string (raw UTF-8 cannot
# encode one); a pair of them is joined by the parser.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: JSONValue) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    return False


def loads(data: bytes) -> JSONValue:
    """
    The JSON value in ``data``; a ``ValueError`` for invalid UTF-8, duplicate
    members, ``NaN``/``Infinity`` and numbers beyond a double, lone surrogates
    (text no UTF-8 writer can write back), integers past Python's digit
    limit, and nesting too deep for the parser (``RecursionError`` otherwise).
    """
    try:
        value: JSONValue = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                                      parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(data) and _has_lone_surrogate(value):
        raise ValueError("a lone surrogate is not text")
    return value
