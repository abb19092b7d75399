"""The private-file writer: mode 0600 whatever the umask, all or nothing, exclusive never replaces."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from jwtlet import files


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "secret"
    files.write_private(path, b"key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"key"


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "secret"
    files.write_private(path, b"key", exclusive=True)
    assert path.read_bytes() == b"key"


def test_a_file_where_the_directory_should_be_is_not_mistaken_for_an_existing_target(tmp_path: Path) -> None:
    """``exclusive`` callers treat FileExistsError as "someone wrote it first": a blocked directory is not that."""
    (tmp_path / "data").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        files.write_private(tmp_path / "data" / "signing.jwk", b"key", exclusive=True)


def test_a_plain_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"old")
    files.write_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


def test_an_exclusive_write_never_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.jwk"
    path.write_bytes(b"the key in use")
    with pytest.raises(FileExistsError):
        files.write_private(path, b"another key", exclusive=True)
    assert path.read_bytes() == b"the key in use"
    assert [p.name for p in tmp_path.iterdir()] == ["signing.jwk"]


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_failed_write_leaves_the_old_content_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exclusive: bool
) -> None:
    """A crash before the rename (here: fsync fails) must not leave a half-written file under the final name."""
    path = tmp_path / "token"
    if not exclusive:
        path.write_bytes(b"old")

    def failing_fsync(descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        files.write_private(path, b"new", exclusive=exclusive)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if exclusive else ["token"])
    if not exclusive:
        assert path.read_bytes() == b"old"
