"""
API keys as text: ``<prefix>.<integration_id>.<key_id>.<secret>``.  Making a
key, parsing one strictly, and comparing a presented secret with the stored
digest in constant time.  Pure functions; the store keeps only digests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Callable, Optional, Sequence

import attrs

SECRET_BYTES = 32
#: Tiers are what M-Lab stores: a non-negative 32-bit integer.
MAX_TIER = 2**31 - 1
MAX_KEY_LENGTH = 300
MAX_ID_LENGTH = 64
MAX_SECRET_LENGTH = 128

_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}")
_SECRET = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_SECRET_LENGTH}}}")


@attrs.frozen
class ParsedKey:
    prefix: str
    integration_id: str
    key_id: str
    secret: str = attrs.field(repr=False)


@attrs.frozen
class NewKey:
    """A freshly made key: the text to show once and the digest to store."""

    text: str = attrs.field(repr=False)
    key_id: str
    secret_sha256: bytes = attrs.field(repr=False)


def valid_id(value: str) -> bool:
    """Integration and key ids: 1..64 of ``[A-Za-z0-9_-]`` (no dots: they separate parts)."""
    return _ID.fullmatch(value) is not None


def valid_tier(value: object) -> bool:
    """An integer from 0 to :data:`MAX_TIER` (``true`` is not 1)."""
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= MAX_TIER


def bound_profiles(given: object, configured: Sequence[str]) -> Optional[tuple[str, ...]]:
    """
    The profiles a new integration is bound to (migration.md, M-Lab), from
    ``given`` (a list of profile names, or ``None`` when not given) and the
    profiles configured: each name must be configured; with several
    configured the list is required, with one the integration is bound to
    it (so a profile added later is not open to it), with none it is kept
    for every profile.  Raises ``ValueError`` saying what is wrong.
    """
    if given is None:
        if len(configured) > 1:
            raise ValueError(f"profiles is required: more than one profile is configured ({', '.join(configured)})")
        return tuple(configured) if configured else None
    if not isinstance(given, (list, tuple)) or not given or not all(isinstance(name, str) for name in given):
        raise ValueError("profiles must be a non-empty list of profile names")
    unknown = [name for name in given if configured and name not in configured]
    if unknown:
        raise ValueError(f"no such profile: {', '.join(unknown)} (configured: {', '.join(configured)})")
    return tuple(sorted(set(given)))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def make_key(
    prefix: str,
    integration_id: str,
    key_id: Optional[str],
    random_bytes: Callable[[int], bytes],
) -> NewKey:
    """A new key for ``integration_id``; ``key_id`` is random when not given."""
    chosen_id = key_id if key_id is not None else _b64url(random_bytes(9))
    secret = _b64url(random_bytes(SECRET_BYTES))
    return NewKey(
        text=f"{prefix}.{integration_id}.{chosen_id}.{secret}",
        key_id=chosen_id,
        secret_sha256=digest(secret),
    )


def parse_key(text: str, prefix: str) -> Optional[ParsedKey]:
    """
    The parts of a presented key, or ``None`` for anything malformed: wrong
    prefix, wrong number of parts, empty or over-long parts, other characters.
    """
    if not text or len(text) > MAX_KEY_LENGTH or not text.isascii():
        return None
    parts = text.split(".")
    if len(parts) != 4:
        return None
    given_prefix, integration_id, key_id, secret = parts
    if given_prefix != prefix:
        return None
    if not (valid_id(integration_id) and valid_id(key_id) and _SECRET.fullmatch(secret)):
        return None
    return ParsedKey(given_prefix, integration_id, key_id, secret)


def secret_matches(secret: str, stored_sha256: bytes) -> bool:
    """Constant-time comparison of a presented secret with the stored digest."""
    return hmac.compare_digest(digest(secret), stored_sha256)
