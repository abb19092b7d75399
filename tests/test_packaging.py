"""
The wheel carries the twistd dropin and the built-in plugins, and twistd finds
the dropin where the project was installed from that wheel (as tox does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import jwtlet
from jwtlet.testing.process import bin_path

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_the_dropin_and_the_plugins(tmp_path: Path) -> None:
    subprocess.run(  # noqa: S603
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = tmp_path.glob("jwtlet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/jwtlet_plugin.py" in names
    assert "twisted/__init__.py" not in names, "a twisted/__init__.py would shadow Twisted itself"
    assert "twisted/plugins/__init__.py" not in names
    assert {"jwtlet/plugins/__init__.py", "jwtlet/plugins/local_key.py", "jwtlet/daemon/tap.py"} <= names
    assert not any(name.endswith("dropin.cache") for name in names)


def installed_from_wheel() -> bool:
    return "site-packages" in Path(jwtlet.__file__).resolve().parts


def test_twistd_lists_jwtlet_where_the_wheel_is_installed() -> None:
    if not installed_from_wheel():
        if os.environ.get("CI"):
            pytest.fail("CI must test the installed wheel, not the source tree")
        pytest.skip("jwtlet is imported from the source tree (editable install): twistd cannot see the dropin")
    dropin = Path(sys.prefix).glob("lib/python*/site-packages/twisted/plugins/jwtlet_plugin.py")
    assert list(dropin), "the dropin is installed in site-packages"
    result = subprocess.run([bin_path("twistd"), "--help"], capture_output=True, text=True, timeout=60)  # noqa: S603
    assert result.returncode == 0
    assert any(line.split()[:1] == ["jwtlet"] for line in result.stdout.splitlines()), result.stdout
    options = subprocess.run([bin_path("twistd"), "jwtlet", "--help"], capture_output=True, text=True, timeout=60)  # noqa: S603
    assert "--config" in options.stdout and "--dev" in options.stdout and "--data-dir" in options.stdout
