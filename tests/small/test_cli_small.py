"""influx_spout.cli: what can be checked without starting a component."""

from __future__ import annotations

import platform

from influx_spout import cli


def test_malloc_is_tuned_on_glibc() -> None:
    # Debian and the CI machine use glibc; elsewhere tune_malloc changes nothing
    assert cli.tune_malloc() == (platform.libc_ver()[0] == "glibc")
