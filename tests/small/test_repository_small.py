"""What the repository itself promises: the license pyproject.toml names is there, and
every hint a test gives for installing a missing server points inside the repository."""

from __future__ import annotations

import re
import tomllib

from support.servers import REPO_ROOT


def test_the_license_file_is_the_one_pyproject_declares() -> None:
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_install_hints_point_to_scripts_setup_or_the_readme() -> None:
    hints = []
    for path in (REPO_ROOT / "tests").rglob("*.py"):
        source = path.read_text()
        hints += re.findall(r"find_executable\(\s*\"[^\"]+\",\s*(\"[^\"]*\"|[A-Z_]+)", source)
        hints += re.findall(r"^[A-Z_]+_INSTALL = (\"[^\"]*\")", source, re.M)
    assert hints
    for hint in hints:
        assert hint.isupper() or "scripts/setup" in hint or "README" in hint, hint
