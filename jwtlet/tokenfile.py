"""
A bearer token kept in a file that something else rotates (the kubelet's
projected service-account token, Vault agent's sink).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import attrs


@attrs.define
class TokenFile:
    """
    Reads a token file and re-reads it when its modification time, size or
    inode changes, or when a caller says the current token was refused.
    Reading is a ``stat`` per use, so a rotated file is picked up at once.
    """

    path: Path = attrs.field(converter=Path)
    _token: Optional[str] = attrs.field(default=None, init=False)
    _signature: Optional[tuple[int, int, int]] = attrs.field(default=None, init=False)

    def read(self) -> str:
        """
        The current token.  Raises ``OSError`` when the file cannot be read
        and ``ValueError`` when it is empty.
        """
        stat = os.stat(self.path)
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._token is None or signature != self._signature:
            token = self.path.read_text(encoding="utf-8").strip()
            if not token:
                raise ValueError(f"{self.path} is empty")
            self._token = token
            self._signature = signature
        return self._token

    def refused(self) -> str:
        """The token was refused: forget it and read the file again."""
        self._token = None
        self._signature = None
        return self.read()
