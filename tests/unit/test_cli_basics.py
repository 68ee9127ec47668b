"""The CLI's contract: version, usage errors exit 2."""

from __future__ import annotations

import subprocess
import sys

from litefspy import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args], capture_output=True, text=True, check=False
    )


def test_version_prints_package_version() -> None:
    res = run_cli("version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"litefspy {__version__}"


def test_unknown_command_is_usage_error() -> None:
    res = run_cli("frobnicate")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr


def test_no_command_is_usage_error() -> None:
    res = run_cli()
    assert res.returncode == 2
