"""
Reading one table of the raw configuration with every problem collected.

The core reads its own sections with :class:`SectionReader`, and a plugin may
read its options with it too, so that every message has the same shape
(``key.path: what is wrong``) and unknown keys are caught the same way::

    problems: list[str] = []
    section = SectionReader(options, "", problems)
    url = section.get("url", as_nonempty_str, check=https_url(context.config.dev))
    timeout = section.get("timeout_secs", as_number, 5.0, in_range(0.1, 60))
    section.finish()                      # every key not read: "unknown key"
    if problems:
        raise PluginConfigError(*problems)

A plugin reads with an empty path: the daemon prefixes each message with the
section the options came from.  Converters (``as_*``) raise ``ValueError``
with the message to report; checks return a message or ``None``.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any, Callable, Mapping, Optional, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

#: ``default`` of :meth:`SectionReader.get` for a key that must be given.
#: ``Any``, as :meth:`SectionReader.get`'s ``default`` is (see there).
REQUIRED: Any = object()  # type: ignore[explicit-any]


class SectionReader:
    """
    Reads one table, recording each problem under its key path and
    remembering which keys were read, so that :meth:`finish` can report the
    rest as unknown (a typo must not fall back to a default silently).
    """

    def __init__(self, raw: object, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.problem("", "must be a table")
            raw = {}
        self.raw: Mapping[str, object] = raw
        self.read: set[str] = set()

    def key_path(self, key: str) -> str:
        """``key``'s path as an operator would write it (``token.audience``)."""
        return f"{self.path}.{key}" if self.path and key else (self.path or key)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.key_path(key)}: {message}")

    # ``Any`` in, ``Any`` out: the answer is ``kind``'s result, ``default`` or
    # ``None`` after a problem, and every caller (plugins too) relies on
    # reading it as ``kind``'s type; overloads saying so are a change of the
    # public section reader for its own step.
    def get(  # type: ignore[explicit-any]
        self,
        key: str,
        kind: Callable[[object], T],
        default: Any = REQUIRED,
        check: Optional[Callable[[T], Optional[str]]] = None,
    ) -> Any:
        """
        The value at ``key`` converted by ``kind``; ``default`` when the key is
        absent or null (``REQUIRED``: the absence is a problem and the answer
        ``None``).  A value that does not convert is reported and ``default``
        is returned, so reading goes on and later problems are found too.
        """
        self.read.add(key)
        value = self.raw.get(key)
        if value is None:
            if default is REQUIRED:
                self.problem(key, "required")
                return None
            return default
        try:
            converted = kind(value)
        except ValueError as error:
            self.problem(key, str(error))
            return None if default is REQUIRED else default
        if check is not None:
            message = check(converted)
            if message:
                self.problem(key, message)
        return converted

    def table(self, key: str) -> SectionReader:
        """A reader of the table at ``key`` (an absent table reads as empty)."""
        self.read.add(key)
        return SectionReader(self.raw.get(key), self.key_path(key), self.problems)

    def present(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def rest(self) -> dict[str, object]:
        """The keys not read yet (a plugin section's options), now counted as read."""
        rest = {k: v for k, v in self.raw.items() if k not in self.read}
        self.read.update(rest)
        return rest

    def finish(self) -> None:
        """Report every key that was never read as unknown."""
        for key in self.raw:
            if key not in self.read:
                self.problem(str(key), "unknown key")


# -- converters: raise ValueError with the message to report ------------------


def as_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    return value


def as_nonempty_str(value: object) -> str:
    text = as_str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def as_int(value: object) -> int:
    # bool is an int subclass: ``true`` must not pass for 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {type(value).__name__}")
    return value


def as_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")  # YAML's .nan and .inf
    return float(value)


def as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {type(value).__name__}")
    return value


def as_str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def as_table(value: object) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a table")
    return dict(value)


# -- checks: a message, or None -------------------------------------------------


def in_range(low: float, high: float) -> Callable[[float], Optional[str]]:
    def check(value: float) -> Optional[str]:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def no_dots(value: str) -> Optional[str]:
    # An API key's parts are separated by dots: a dot in its prefix would make them ambiguous.
    return "must not contain '.'" if "." in value else None


def positive(value: float) -> Optional[str]:
    return None if value > 0 else "must be greater than 0"


def one_of(*choices: str) -> Callable[[str], Optional[str]]:
    def check(value: str) -> Optional[str]:
        if value in choices:
            return None
        return f"must be {', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else f"must be {choices[0]}"

    return check


def is_loopback_host(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def https_url(dev: bool) -> Callable[[str], Optional[str]]:
    """
    The outbound URL rule of security.md: ``https``, or ``http`` only to a
    loopback host or in ``--dev`` (a token sent in clear to anywhere else
    could be read on the way).
    """

    def check(url: str) -> Optional[str]:
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:  # e.g. an unclosed IPv6 bracket
            return "must be an absolute https URL"
        if not parts.netloc or parts.scheme not in ("https", "http"):
            return "must be an absolute https URL"
        if parts.scheme == "http" and not (dev or is_loopback_host(host)):
            return "must be https (http is allowed only for loopback hosts or with --dev)"
        return None

    return check
