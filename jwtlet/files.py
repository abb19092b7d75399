"""
The one way jwtlet writes a private file (signing keys, minted tokens, the dev
mode marker): readers see the whole file or nothing, only the owner can read
it, and an ``exclusive`` write never replaces what is there.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path, data: bytes, *, exclusive: bool = False, mode: int = PRIVATE_MODE) -> None:
    """
    Write ``data`` to ``path`` with mode 0600 (whatever the umask; ``mode``
    when a caller such as ``jwtlet mint --mode`` must share the file with its
    group), creating missing parent directories.

    The bytes go to a temporary file in the same directory (so the final step
    never crosses a filesystem), are fsynced, and the file then takes its name
    in one step: ``rename`` replaces an existing file; with ``exclusive`` a hard
    link is made instead, which fails with ``FileExistsError`` if ``path``
    exists.  A link rather than an ``O_EXCL`` open of ``path`` itself keeps the
    exclusive write atomic too: a crash mid-write never leaves a truncated key
    under the final name, which a restart would then refuse to overwrite.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        # Something that is not a directory stands where one is needed: not
        # the FileExistsError an exclusive write means "the file is there".
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp already creates 0600; fchmod says so explicitly and ignores the umask.
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if exclusive:
            os.link(temporary, path)
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    _sync_directory(path.parent)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_directory(directory: Path) -> None:
    """Make the new name itself durable: a rename lives in the directory, not the file."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
